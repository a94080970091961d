//! InternViT, the vision transformer of InternVL and NVLM-D (transformers'
//! `models/internvl/modeling_internvl.py`: `InternVLVisionModel`; OpenGVLab's `InternVisionModel`).
//!
//! Pre-norm ViT with a CLS token and learned absolute position embeddings; LayerNorm (300M) or
//! RMSNorm (6B); optional RMSNorm over the full width of q and k; layer scale on both residual
//! branches.

use burn::module::{Initializer, Module, Param};
use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::{
    Activation, Linear, LinearConfig, Norm, NormConfig, NormKind, RmsNorm, RmsNormConfig, scaled_dot_product_attention,
};

/// Shape and options of an InternViT.
#[derive(Debug, Clone, PartialEq)]
pub struct InternVitConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Inner width of the MLP.
    pub intermediate_size: usize,
    /// LayerNorm or RMSNorm for the pre-norms.
    pub norm: NormKind,
    /// Epsilon of every norm in the tower.
    pub layer_norm_eps: f64,
    /// Whether q, k and v projections have biases.
    pub qkv_bias: bool,
    /// RMSNorm over the full width of q and of k before splitting heads.
    pub qk_norm: bool,
    /// Side of the square input image in pixels.
    pub image_size: usize,
    /// Side of a square patch in pixels.
    pub patch_size: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Activation of the MLP.
    pub hidden_act: Activation,
}

impl InternVitConfig {
    /// A two-layer tower small enough for unit tests.
    pub fn tiny() -> Self {
        Self {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            norm: NormKind::LayerNorm,
            layer_norm_eps: 1e-6,
            qkv_bias: true,
            qk_norm: false,
            image_size: 56,
            patch_size: 14,
            num_channels: 3,
            hidden_act: Activation::Gelu,
        }
    }

    /// A lower bound of the parameter count (the matrices and the position table, in saturating
    /// arithmetic): lets the loader refuse an absurd configuration before allocating anything.
    pub fn min_parameters(&self) -> u128 {
        let (c, i) = (self.hidden_size as u128, self.intermediate_size as u128);
        let patch = (self.num_channels * self.patch_size * self.patch_size) as u128;
        let positions = (self.patches_per_side() as u128).saturating_pow(2).saturating_add(1);
        let layer = c.saturating_mul(c).saturating_mul(4).saturating_add(c.saturating_mul(i).saturating_mul(2));
        let embeddings = c.saturating_mul(patch).saturating_add(c.saturating_mul(positions));
        layer.saturating_mul(self.num_hidden_layers as u128).saturating_add(embeddings)
    }

    /// Patches per side of the image.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Creates the tower (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> InternVit {
        let c = self.hidden_size;
        let p = self.patch_size;
        let patches = self.patches_per_side() * self.patches_per_side();
        InternVit {
            embeddings: VisionEmbeddings {
                cls_token: Initializer::Zeros.init([1, 1, c], device),
                position_embeddings: Initializer::Zeros.init([1, patches + 1, c], device),
                patch_embeddings: PatchEmbeddings {
                    projection: PatchProjection {
                        weight: Initializer::Zeros.init([c, self.num_channels, p, p], device),
                        bias: Initializer::Zeros.init([c], device),
                    },
                },
            },
            encoder: VisionEncoder { layer: (0..self.num_hidden_layers).map(|_| self.init_layer(device)).collect() },
            image_size: self.image_size,
            num_channels: self.num_channels,
        }
    }

    fn init_layer(&self, device: &Device) -> VisionLayer {
        let c = self.hidden_size;
        let norm = NormConfig { kind: self.norm, d_model: c, eps: self.layer_norm_eps };
        let qk_norm = RmsNormConfig { d_model: c, eps: self.layer_norm_eps };
        VisionLayer {
            attention: VisionAttention {
                q_proj: LinearConfig::new(c, c, self.qkv_bias).init(device),
                k_proj: LinearConfig::new(c, c, self.qkv_bias).init(device),
                v_proj: LinearConfig::new(c, c, self.qkv_bias).init(device),
                q_norm: self.qk_norm.then(|| qk_norm.init(device)),
                k_norm: self.qk_norm.then(|| qk_norm.init(device)),
                projection_layer: LinearConfig::new(c, c, true).init(device),
                num_heads: self.num_attention_heads,
            },
            mlp: VisionMlp {
                fc1: LinearConfig::new(c, self.intermediate_size, true).init(device),
                fc2: LinearConfig::new(self.intermediate_size, c, true).init(device),
                activation: self.hidden_act,
            },
            layernorm_before: norm.init(device),
            layernorm_after: norm.init(device),
            lambda_1: Initializer::Ones.init([c], device),
            lambda_2: Initializer::Ones.init([c], device),
        }
    }
}

/// InternViT: embeddings followed by pre-norm transformer layers.
#[derive(Module, Debug)]
pub struct InternVit {
    /// CLS token, patch projection and position embeddings.
    pub embeddings: VisionEmbeddings,
    /// The transformer layers.
    pub encoder: VisionEncoder,
    #[module(skip)]
    image_size: usize,
    #[module(skip)]
    num_channels: usize,
}

impl InternVit {
    /// Runs the embeddings and the first `num_layers` layers (the feature layer a VLM selects).
    ///
    /// # Shapes
    /// - pixel_values: `[tiles, channels, image_size, image_size]`
    /// - output: `[tiles, 1 + patches, hidden]` (CLS first)
    pub fn forward(&self, pixel_values: Tensor<4>, num_layers: usize) -> Result<Tensor<3>> {
        let [_, channels, height, width] = pixel_values.dims();
        let size = self.image_size;
        if channels != self.num_channels || height != size || width != size {
            return Err(Error::Input(format!(
                "pixel values of shape [_, {channels}, {height}, {width}], the vision tower expects \
                 [_, {}, {size}, {size}]",
                self.num_channels
            )));
        }
        if num_layers > self.encoder.layer.len() {
            return Err(Error::Input(format!(
                "feature layer {num_layers} requested from a vision tower of {} layers",
                self.encoder.layer.len()
            )));
        }
        let mut hidden = self.embeddings.forward(pixel_values);
        for layer in &self.encoder.layer[..num_layers] {
            hidden = layer.forward(hidden);
        }
        Ok(hidden)
    }

    /// Number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.encoder.layer.len()
    }
}

/// CLS token + patch embeddings + absolute position embeddings (`InternVLVisionEmbeddings`).
#[derive(Module, Debug)]
pub struct VisionEmbeddings {
    /// `[1, 1, hidden]`
    pub cls_token: Param<Tensor<3>>,
    /// `[1, 1 + patches, hidden]`
    pub position_embeddings: Param<Tensor<3>>,
    /// The patch projection.
    pub patch_embeddings: PatchEmbeddings,
}

impl VisionEmbeddings {
    /// # Shapes
    /// - pixel_values: `[tiles, channels, size, size]`
    /// - output: `[tiles, 1 + patches, hidden]`
    fn forward(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let patches = self.patch_embeddings.projection.forward(pixel_values);
        let [tiles, _, hidden] = patches.dims();
        let cls = self.cls_token.val().expand([tiles, 1, hidden]);
        Tensor::cat(vec![cls, patches], 1) + self.position_embeddings.val()
    }
}

/// Holds the patch projection under the checkpoint's name.
#[derive(Module, Debug)]
pub struct PatchEmbeddings {
    /// A `Conv2d(channels, hidden, kernel = stride = patch)`.
    pub projection: PatchProjection,
}

/// A non-overlapping patch convolution, computed as one matrix product (as fast as a conv and
/// much faster on CPU backends).
#[derive(Module, Debug)]
pub struct PatchProjection {
    /// `[hidden, channels, patch, patch]`
    pub weight: Param<Tensor<4>>,
    /// `[hidden]`
    pub bias: Param<Tensor<1>>,
}

impl PatchProjection {
    /// # Shapes
    /// - pixel_values: `[tiles, channels, size, size]`
    /// - output: `[tiles, (size / patch)^2, hidden]`, patches row-major
    fn forward(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let [hidden, channels, patch, _] = self.weight.dims();
        let [tiles, _, height, width] = pixel_values.dims();
        let (rows, cols) = (height / patch, width / patch);
        let patches = pixel_values
            .reshape([tiles, channels, rows, patch, cols, patch])
            .permute([0, 2, 4, 1, 3, 5]) // [tiles, rows, cols, channels, patch, patch]
            .reshape([tiles, rows * cols, channels * patch * patch]);
        let weight = self.weight.val().reshape([hidden, channels * patch * patch]);
        burn::tensor::module::linear(patches, weight.transpose(), Some(self.bias.val()))
    }
}

/// The stack of layers, named as in the checkpoint (`encoder.layer.N`).
#[derive(Module, Debug)]
pub struct VisionEncoder {
    /// The layers, in order.
    pub layer: Vec<VisionLayer>,
}

/// One pre-norm layer with layer scale (`InternVLVisionLayer`).
#[derive(Module, Debug)]
pub struct VisionLayer {
    /// Self-attention.
    pub attention: VisionAttention,
    /// Feed-forward block.
    pub mlp: VisionMlp,
    /// Norm before attention.
    pub layernorm_before: Norm,
    /// Norm before the MLP.
    pub layernorm_after: Norm,
    /// Layer scale of the attention branch, `[hidden]`.
    pub lambda_1: Param<Tensor<1>>,
    /// Layer scale of the MLP branch, `[hidden]`.
    pub lambda_2: Param<Tensor<1>>,
}

impl VisionLayer {
    /// # Shapes
    /// - input and output: `[tiles, tokens, hidden]`
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let attn = self.attention.forward(self.layernorm_before.forward(x.clone()));
        let x = x + attn * self.lambda_1.val().unsqueeze();
        let mlp = self.mlp.forward(self.layernorm_after.forward(x.clone()));
        x + mlp * self.lambda_2.val().unsqueeze()
    }
}

/// Bidirectional multi-head attention with optional qk-norm (`InternVLVisionAttention`).
#[derive(Module, Debug)]
pub struct VisionAttention {
    /// `[hidden, hidden]`
    pub q_proj: Linear,
    /// `[hidden, hidden]`
    pub k_proj: Linear,
    /// `[hidden, hidden]`
    pub v_proj: Linear,
    /// RMSNorm over the full query width (InternViT-6B).
    pub q_norm: Option<RmsNorm>,
    /// RMSNorm over the full key width (InternViT-6B).
    pub k_norm: Option<RmsNorm>,
    /// Output projection, always with bias.
    pub projection_layer: Linear,
    #[module(skip)]
    num_heads: usize,
}

impl VisionAttention {
    /// # Shapes
    /// - input and output: `[tiles, tokens, hidden]`
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [tiles, tokens, hidden] = x.dims();
        let head_dim = hidden / self.num_heads;
        let mut q = self.q_proj.forward(x.clone());
        let mut k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        if let (Some(q_norm), Some(k_norm)) = (&self.q_norm, &self.k_norm) {
            q = q_norm.forward(q);
            k = k_norm.forward(k);
        }
        // [tiles, tokens, hidden] -> [tiles, heads, tokens, head_dim]
        let heads = |t: Tensor<3>| t.reshape([tiles, tokens, self.num_heads, head_dim]).swap_dims(1, 2);
        let scale = (head_dim as f64).powf(-0.5);
        let out = scaled_dot_product_attention(heads(q), heads(k), heads(v), None, scale);
        // [tiles, heads, tokens, head_dim] -> [tiles, tokens, hidden]
        let out = out.swap_dims(1, 2).reshape([tiles, tokens, hidden]);
        self.projection_layer.forward(out)
    }
}

/// `fc2(act(fc1(x)))` (`InternVLVisionMLP`).
#[derive(Module, Debug)]
pub struct VisionMlp {
    /// `[intermediate, hidden]`
    pub fc1: Linear,
    /// `[hidden, intermediate]`
    pub fc2: Linear,
    #[module(skip)]
    activation: Activation,
}

impl VisionMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.fc2.forward(self.activation.forward(self.fc1.forward(x)))
    }
}
