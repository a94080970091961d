//! Pixtral's vision encoder (transformers' `models/pixtral/modeling_pixtral.py`,
//! `PixtralVisionModel`): a bias-free patch convolution over each image at its own size, RMSNorm,
//! and pre-norm blocks with 2D rotary positions (rows on the even frequencies, columns on the odd
//! ones) and a SiLU-gated MLP. Several images run as one sequence, each attending only to itself.
//! No CLS token, no position table, no final norm.

use burn::module::{Initializer, Module, Param};
use burn::tensor::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::rope::{axial_tables, rotate_half};
use crate::nn::{
    Activation, GatedMlp, GatedMlpConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig, segment_attention,
};

/// Epsilon of every norm of the encoder (hard-coded in transformers).
const NORM_EPS: f64 = 1e-5;

/// Shape and options of a Pixtral vision encoder (`PixtralVisionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct PixtralVisionConfig {
    /// Width.
    pub hidden_size: usize,
    /// Inner width of the MLPs.
    pub intermediate_size: usize,
    /// Blocks.
    pub num_hidden_layers: usize,
    /// Attention heads (head width = `hidden_size / num_attention_heads`).
    pub num_attention_heads: usize,
    /// Colour channels.
    pub num_channels: usize,
    /// Side of a patch in pixels.
    pub patch_size: usize,
    /// Activation of the MLP gate (`silu` in Pixtral-12B; the class default is `gelu`).
    pub hidden_act: Activation,
    /// Base of the 2D rotary embedding.
    pub rope_theta: f64,
}

impl PixtralVisionConfig {
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        let (c, i) = (self.hidden_size as u128, self.intermediate_size as u128);
        let block = c.saturating_mul(c).saturating_mul(4).saturating_add(c.saturating_mul(i).saturating_mul(3));
        let patch = c.saturating_mul((self.num_channels * self.patch_size * self.patch_size) as u128);
        block.saturating_mul(self.num_hidden_layers as u128).saturating_add(patch)
    }

    /// Creates the encoder (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> PixtralVision {
        let (c, p) = (self.hidden_size, self.patch_size);
        let norm = RmsNormConfig { d_model: c, eps: NORM_EPS };
        let layer = || PixtralLayer {
            attention_norm: norm.init(device),
            attention: PixtralAttention {
                q_proj: LinearConfig::new(c, c, false).init(device),
                k_proj: LinearConfig::new(c, c, false).init(device),
                v_proj: LinearConfig::new(c, c, false).init(device),
                o_proj: LinearConfig::new(c, c, false).init(device),
                num_heads: self.num_attention_heads,
            },
            ffn_norm: norm.init(device),
            feed_forward: GatedMlpConfig {
                hidden_size: c,
                intermediate_size: self.intermediate_size,
                activation: self.hidden_act,
                bias: false,
                quantization: None,
            }
            .init(device),
        };
        PixtralVision {
            patch_conv: PatchConv { weight: Initializer::Zeros.init([c, self.num_channels, p, p], device) },
            ln_pre: norm.init(device),
            transformer: PixtralTransformer { layers: (0..self.num_hidden_layers).map(|_| layer()).collect() },
            config: self.clone(),
        }
    }
}

/// The Pixtral vision encoder.
#[derive(Module, Debug)]
pub struct PixtralVision {
    /// The patch convolution (kernel = stride = patch, no bias).
    pub patch_conv: PatchConv,
    /// RMSNorm of the patch embeddings.
    pub ln_pre: RmsNorm,
    /// The blocks.
    pub transformer: PixtralTransformer,
    #[module(skip)]
    config: PixtralVisionConfig,
}

impl PixtralVision {
    /// The configuration the encoder was built from.
    pub fn config(&self) -> &PixtralVisionConfig {
        &self.config
    }

    /// Encodes several images of their own sizes (multiples of the patch) as one sequence, and
    /// returns the hidden states after `ln_pre` and after each of the first `layers` blocks
    /// (transformers' `hidden_states`: index 0 is the blocks' input).
    ///
    /// # Shapes
    /// - images: each `[channels, height, width]`, normalised
    /// - output: `layers + 1` tensors `[patches of every image, hidden]`, patches row-major per image
    pub fn hidden_states(&self, images: &[Tensor<3>], layers: usize) -> Result<Vec<Tensor<2>>> {
        let p = self.config.patch_size;
        let mut patches = Vec::with_capacity(images.len());
        let mut positions = Vec::new();
        let mut segments = Vec::with_capacity(images.len());
        for image in images {
            let [channels, height, width] = image.dims();
            if channels != self.config.num_channels || height % p != 0 || width % p != 0 || height == 0 || width == 0 {
                return Err(Error::Input(format!(
                    "a {channels}x{height}x{width} image for {p}-pixel patches of {} channels",
                    self.config.num_channels
                )));
            }
            let (rows, cols) = (height / p, width / p);
            // [channels, rows * p, cols * p] -> [rows * cols, channels * p * p], row-major patches
            let flat = image
                .clone()
                .reshape([channels, rows, p, cols, p])
                .permute([1, 3, 0, 2, 4])
                .reshape([rows * cols, channels * p * p]);
            patches.push(flat);
            positions.extend((0..rows).flat_map(|r| (0..cols).map(move |c| [r, c])));
            segments.push(rows * cols);
        }
        if patches.is_empty() {
            return Err(Error::Input("no images to encode".into()));
        }
        let x = self.patch_conv.forward(Tensor::cat(patches, 0));
        let mut x = self.ln_pre.forward(x);
        let (cos, sin) = rotary_tables(&positions, self.config.head_dim(), self.config.rope_theta, &x.device());
        let mut states = vec![x.clone()];
        for layer in self.transformer.layers.iter().take(layers) {
            x = layer.forward(x, &cos, &sin, &segments);
            states.push(x.clone());
        }
        Ok(states)
    }
}

/// Cosines and sines of Pixtral's 2D RoPE, `[patches, 1, head_dim]` in f32: of the frequencies
/// `theta^(-2i/d)`, the even-indexed ones rotate by the patch's row and the odd-indexed ones by its
/// column, and the half repeats (rotate-half convention).
fn rotary_tables(positions: &[[usize; 2]], head_dim: usize, theta: f64, device: &Device) -> (Tensor<3>, Tensor<3>) {
    let inv_freq: Vec<f32> =
        (0..head_dim).step_by(2).map(|i| 1.0 / (theta as f32).powf(i as f32 / head_dim as f32)).collect();
    let rows: Vec<f32> = inv_freq.iter().copied().step_by(2).collect();
    let cols: Vec<f32> = inv_freq.iter().copied().skip(1).step_by(2).collect();
    axial_tables(positions, &rows, &cols, device)
}

/// A `Conv2d(channels, hidden, kernel = stride = patch, bias = False)` over patches already
/// flattened as `(channel, row, column)`: one matrix product.
#[derive(Module, Debug)]
pub struct PatchConv {
    /// `[hidden, channels, patch, patch]`
    pub weight: Param<Tensor<4>>,
}

impl PatchConv {
    fn forward(&self, patches: Tensor<2>) -> Tensor<2> {
        let [hidden, channels, patch, _] = self.weight.dims();
        let weight = self.weight.val().reshape([hidden, channels * patch * patch]);
        let dtype = weight.dtype();
        burn::tensor::module::linear(patches.cast(dtype), weight.transpose(), None)
    }
}

/// The blocks, named as in the checkpoint (`transformer.layers.N`).
#[derive(Module, Debug)]
pub struct PixtralTransformer {
    /// The blocks, in order.
    pub layers: Vec<PixtralLayer>,
}

/// One pre-norm block (`PixtralAttentionLayer`).
#[derive(Module, Debug)]
pub struct PixtralLayer {
    /// Norm before attention.
    pub attention_norm: RmsNorm,
    /// Self-attention within each image.
    pub attention: PixtralAttention,
    /// Norm before the MLP.
    pub ffn_norm: RmsNorm,
    /// SiLU-gated MLP.
    pub feed_forward: GatedMlp,
}

impl PixtralLayer {
    fn forward(&self, x: Tensor<2>, cos: &Tensor<3>, sin: &Tensor<3>, segments: &[usize]) -> Tensor<2> {
        let h = x.clone() + self.attention.forward(self.attention_norm.forward(x), cos, sin, segments);
        let mlp = self.feed_forward.forward(self.ffn_norm.forward(h.clone()).unsqueeze_dim::<3>(0)).squeeze_dim::<2>(0);
        h + mlp
    }
}

/// Multi-head attention with 2D RoPE, each image attending to itself (`PixtralAttention`).
#[derive(Module, Debug)]
pub struct PixtralAttention {
    /// `[hidden, hidden]`
    pub q_proj: Linear,
    /// `[hidden, hidden]`
    pub k_proj: Linear,
    /// `[hidden, hidden]`
    pub v_proj: Linear,
    /// `[hidden, hidden]`
    pub o_proj: Linear,
    #[module(skip)]
    num_heads: usize,
}

impl PixtralAttention {
    fn forward(&self, x: Tensor<2>, cos: &Tensor<3>, sin: &Tensor<3>, segments: &[usize]) -> Tensor<2> {
        let [patches, hidden] = x.dims();
        let head_dim = hidden / self.num_heads;
        let dtype = x.dtype();
        // [patches, hidden] -> [patches, heads, head_dim]
        let heads = |t: Tensor<2>| t.reshape([patches, self.num_heads, head_dim]);
        let rotate = |t: Tensor<3>| {
            let t = t.cast(DType::F32);
            (t.clone() * cos.clone() + rotate_half(t) * sin.clone()).cast(dtype)
        };
        let q = rotate(heads(self.q_proj.forward(x.clone())));
        let k = rotate(heads(self.k_proj.forward(x.clone())));
        let v = heads(self.v_proj.forward(x));
        let out = segment_attention(q, k, v, segments, (head_dim as f64).powf(-0.5));
        self.o_proj.forward(out.reshape([patches, hidden]))
    }
}
