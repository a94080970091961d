//! CLIP's vision encoder as LLaVA uses it (transformers' `models/clip/modeling_clip.py`,
//! `CLIPVisionModel`): patch embedding without bias, a CLS token and learned absolute positions,
//! `pre_layrnorm`, and pre-norm blocks with quick-GELU MLPs. LLaVA reads a hidden state of the
//! stack; `post_layernorm` (for the pooled CLS) is loaded but not used.

use burn::module::{Initializer, Module, Param};
use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::{Activation, LayerNorm, LayerNormConfig, Linear, LinearConfig, scaled_dot_product_attention};
use crate::text::decoder::Embedding;

/// Shape and options of a CLIP vision encoder (`CLIPVisionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    /// Width.
    pub hidden_size: usize,
    /// Inner width of the MLPs.
    pub intermediate_size: usize,
    /// Blocks.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Colour channels.
    pub num_channels: usize,
    /// Side of the (square) input in pixels.
    pub image_size: usize,
    /// Side of a patch in pixels.
    pub patch_size: usize,
    /// Activation of the MLPs (`quick_gelu`).
    pub hidden_act: Activation,
    /// Epsilon of the LayerNorms.
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Patches of an image (CLS not counted).
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch_size.max(1)).pow(2)
    }

    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        let (c, i) = (self.hidden_size as u128, self.intermediate_size as u128);
        let block = c.saturating_mul(c).saturating_mul(4).saturating_add(c.saturating_mul(i).saturating_mul(2));
        let embeddings =
            c.saturating_mul((self.num_channels * self.patch_size * self.patch_size + self.patches() + 1) as u128);
        block.saturating_mul(self.num_hidden_layers as u128).saturating_add(embeddings)
    }

    /// Creates the encoder (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> ClipVision {
        let (c, p) = (self.hidden_size, self.patch_size);
        let norm = LayerNormConfig { d_model: c, eps: self.layer_norm_eps, bias: true };
        let layer = || ClipLayer {
            layer_norm1: norm.init(device),
            self_attn: ClipAttention {
                q_proj: LinearConfig::new(c, c, true).init(device),
                k_proj: LinearConfig::new(c, c, true).init(device),
                v_proj: LinearConfig::new(c, c, true).init(device),
                out_proj: LinearConfig::new(c, c, true).init(device),
                num_heads: self.num_attention_heads,
            },
            layer_norm2: norm.init(device),
            mlp: ClipMlp {
                fc1: LinearConfig::new(c, self.intermediate_size, true).init(device),
                fc2: LinearConfig::new(self.intermediate_size, c, true).init(device),
                activation: self.hidden_act,
            },
        };
        ClipVision {
            embeddings: ClipEmbeddings {
                class_embedding: Initializer::Zeros.init([c], device),
                patch_embedding: ClipPatchEmbedding {
                    weight: Initializer::Zeros.init([c, self.num_channels, p, p], device),
                },
                position_embedding: Embedding { weight: Initializer::Zeros.init([self.patches() + 1, c], device) },
            },
            pre_layrnorm: norm.init(device),
            encoder: ClipEncoder { layers: (0..self.num_hidden_layers).map(|_| layer()).collect() },
            post_layernorm: norm.init(device),
            config: self.clone(),
        }
    }
}

/// The CLIP vision encoder.
#[derive(Module, Debug)]
pub struct ClipVision {
    /// CLS, patches and positions.
    pub embeddings: ClipEmbeddings,
    /// LayerNorm of the embeddings (transformers' spelling).
    pub pre_layrnorm: LayerNorm,
    /// The blocks.
    pub encoder: ClipEncoder,
    /// LayerNorm of the pooled CLS (unused by LLaVA, loaded to account for every tensor).
    pub post_layernorm: LayerNorm,
    #[module(skip)]
    config: ClipVisionConfig,
}

impl ClipVision {
    /// The configuration the encoder was built from.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The hidden states after `pre_layrnorm` and after each of the first `layers` blocks
    /// (transformers' `hidden_states`: index 0 is the blocks' input).
    ///
    /// # Shapes
    /// - pixel_values: `[images, channels, image_size, image_size]`, normalised
    /// - output: `layers + 1` tensors `[images, 1 + patches, hidden]`, CLS first
    pub fn hidden_states(&self, pixel_values: Tensor<4>, layers: usize) -> Result<Vec<Tensor<3>>> {
        let [images, channels, height, width] = pixel_values.dims();
        let size = self.config.image_size;
        if channels != self.config.num_channels || height != size || width != size {
            return Err(Error::Input(format!("CLIP takes {size}x{size} images, got {channels}x{height}x{width}")));
        }
        let mut x = self.pre_layrnorm.forward(self.embeddings.forward(pixel_values, images));
        let mut states = vec![x.clone()];
        for layer in self.encoder.layers.iter().take(layers) {
            x = layer.forward(x);
            states.push(x.clone());
        }
        Ok(states)
    }
}

/// CLS token, patch embedding and learned positions.
#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    /// `[hidden]`
    pub class_embedding: Param<Tensor<1>>,
    /// The patch convolution.
    pub patch_embedding: ClipPatchEmbedding,
    /// `[1 + patches, hidden]`
    pub position_embedding: Embedding,
}

impl ClipEmbeddings {
    /// # Shapes
    /// - pixel_values: `[images, channels, size, size]`
    /// - output: `[images, 1 + patches, hidden]`
    fn forward(&self, pixel_values: Tensor<4>, images: usize) -> Tensor<3> {
        let patches = self.patch_embedding.forward(pixel_values);
        let [_, _, hidden] = patches.dims();
        let cls = self.class_embedding.val().reshape([1, 1, hidden]).expand([images, 1, hidden]);
        Tensor::cat(vec![cls, patches], 1) + self.position_embedding.weight.val().unsqueeze()
    }
}

/// A `Conv2d(channels, hidden, kernel = stride = patch, bias = False)`, as one matrix product.
#[derive(Module, Debug)]
pub struct ClipPatchEmbedding {
    /// `[hidden, channels, patch, patch]`
    pub weight: Param<Tensor<4>>,
}

impl ClipPatchEmbedding {
    /// # Shapes
    /// - pixel_values: `[images, channels, size, size]`
    /// - output: `[images, (size / patch)^2, hidden]`, patches row-major
    fn forward(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let [hidden, channels, patch, _] = self.weight.dims();
        let [images, _, height, width] = pixel_values.dims();
        let (rows, cols) = (height / patch, width / patch);
        let patches = pixel_values
            .reshape([images, channels, rows, patch, cols, patch])
            .permute([0, 2, 4, 1, 3, 5]) // [images, rows, cols, channels, patch, patch]
            .reshape([images, rows * cols, channels * patch * patch]);
        let weight = self.weight.val().reshape([hidden, channels * patch * patch]);
        burn::tensor::module::linear(patches, weight.transpose(), None)
    }
}

/// The blocks, named as in the checkpoint (`encoder.layers.N`).
#[derive(Module, Debug)]
pub struct ClipEncoder {
    /// The blocks, in order.
    pub layers: Vec<ClipLayer>,
}

/// One pre-norm block (`CLIPEncoderLayer`).
#[derive(Module, Debug)]
pub struct ClipLayer {
    /// Norm before attention.
    pub layer_norm1: LayerNorm,
    /// Self-attention.
    pub self_attn: ClipAttention,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm,
    /// Feed-forward block.
    pub mlp: ClipMlp,
}

impl ClipLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// Bidirectional multi-head attention with biases (`CLIPAttention`).
#[derive(Module, Debug)]
pub struct ClipAttention {
    /// `[hidden, hidden]`
    pub q_proj: Linear,
    /// `[hidden, hidden]`
    pub k_proj: Linear,
    /// `[hidden, hidden]`
    pub v_proj: Linear,
    /// `[hidden, hidden]`
    pub out_proj: Linear,
    #[module(skip)]
    num_heads: usize,
}

impl ClipAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [images, tokens, hidden] = x.dims();
        let head_dim = hidden / self.num_heads;
        // [images, tokens, hidden] -> [images, heads, tokens, head_dim]
        let heads = |t: Tensor<3>| t.reshape([images, tokens, self.num_heads, head_dim]).swap_dims(1, 2);
        let (q, k, v) = (
            heads(self.q_proj.forward(x.clone())),
            heads(self.k_proj.forward(x.clone())),
            heads(self.v_proj.forward(x)),
        );
        let out = scaled_dot_product_attention(q, k, v, None, (head_dim as f64).powf(-0.5));
        self.out_proj.forward(out.swap_dims(1, 2).reshape([images, tokens, hidden]))
    }
}

/// `fc2(act(fc1(x)))` (`CLIPMLP`).
#[derive(Module, Debug)]
pub struct ClipMlp {
    /// `[intermediate, hidden]`
    pub fc1: Linear,
    /// `[hidden, intermediate]`
    pub fc2: Linear,
    /// Activation between them.
    #[module(skip)]
    pub activation: Activation,
}

impl ClipMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.fc2.forward(self.activation.forward(self.fc1.forward(x)))
    }
}
