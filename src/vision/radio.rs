//! NVIDIA's RADIO vision tower as Nemotron 3 Nano Omni uses it (transformers'
//! `models/radio/modeling_radio.py`, packed form): patches embedded by a linear layer, a learned
//! position table resized (bilinear) to the square of the image's longer side and cropped to its
//! grid, CLS and register tokens before each image's patches, and pre-norm ViT blocks whose
//! attention stays within each image. The Omni model normalises pixels in its processor, so the
//! tower's own input conditioner is not applied.

use burn::module::{Initializer, Module, Param};
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::nn::{Activation, LayerNorm, LayerNormConfig, Linear, LinearConfig, segment_attention};

/// Shape and options of a RADIO tower (`RadioConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct RadioVisionConfig {
    /// Width.
    pub hidden_size: usize,
    /// Inner width of the MLPs (`hidden_size * mlp_ratio`).
    pub intermediate_size: usize,
    /// Blocks.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Colour channels.
    pub num_channels: usize,
    /// Side of a patch in pixels.
    pub patch_size: usize,
    /// Side of the position table in patches (`max_img_size / patch_size`).
    pub position_grid: usize,
    /// CLS and register tokens before each image's patches.
    pub prefix_tokens: usize,
    /// Activation of the MLPs (exact GELU).
    pub hidden_act: Activation,
    /// Epsilon of the LayerNorms.
    pub layer_norm_eps: f64,
    /// Whether the blocks scale their branches (`layer_scale{1,2}.lambda1`; the published
    /// checkpoint has none: identity).
    pub layer_scale: bool,
}

impl RadioVisionConfig {
    /// Values of one flattened patch (`channels * patch^2`).
    pub fn patch_values(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }

    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        let (c, i) = (self.hidden_size as u128, self.intermediate_size as u128);
        let block = c.saturating_mul(c).saturating_mul(4).saturating_add(c.saturating_mul(i).saturating_mul(2));
        let table = (self.position_grid as u128).saturating_mul(self.position_grid as u128);
        let embeddings = c.saturating_mul((self.patch_values() as u128).saturating_add(table));
        block.saturating_mul(self.num_hidden_layers as u128).saturating_add(embeddings)
    }

    /// Creates the tower (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> RadioVision {
        let c = self.hidden_size;
        let norm = LayerNormConfig { d_model: c, eps: self.layer_norm_eps, bias: true };
        let scale = || self.layer_scale.then(|| LayerScale { lambda1: Initializer::Ones.init([c], device) });
        let block = || RadioBlock {
            norm1: norm.init(device),
            attn: RadioAttention {
                qkv: LinearConfig::new(c, 3 * c, true).init(device),
                proj: LinearConfig::new(c, c, true).init(device),
                num_heads: self.num_attention_heads,
            },
            layer_scale1: scale(),
            norm2: norm.init(device),
            mlp: RadioMlp {
                fc1: LinearConfig::new(c, self.intermediate_size, true).init(device),
                fc2: LinearConfig::new(self.intermediate_size, c, true).init(device),
                activation: self.hidden_act,
            },
            layer_scale2: scale(),
        };
        RadioVision {
            patch_generator: PatchGenerator {
                embedder: LinearConfig::new(self.patch_values(), c, false).init(device),
                pos_embed: Initializer::Zeros.init([1, self.position_grid * self.position_grid, c], device),
                cls_token: ClsToken { token: Initializer::Zeros.init([self.prefix_tokens, c], device) },
            },
            blocks: (0..self.num_hidden_layers).map(|_| block()).collect(),
            config: self.clone(),
        }
    }
}

/// The RADIO tower, named as the checkpoint's `radio_model.model`.
#[derive(Module, Debug)]
pub struct RadioVision {
    /// Patch embedding, positions and prefix tokens.
    pub patch_generator: PatchGenerator,
    /// The blocks, in order.
    pub blocks: Vec<RadioBlock>,
    #[module(skip)]
    config: RadioVisionConfig,
}

impl RadioVision {
    /// The configuration the tower was built from.
    pub fn config(&self) -> &RadioVisionConfig {
        &self.config
    }

    /// The embeddings and the output of each of the first `layers` blocks, every image packed
    /// into one sequence (each image: its prefix tokens, then its patches row-major).
    ///
    /// # Shapes
    /// - patches: `[patches, channels * patch^2]`, every image's patches row-major, in order
    /// - grids: `(rows, cols)` of patches per image
    /// - output: `layers + 1` tensors `[images * prefix + patches, hidden]`
    pub fn hidden_states(&self, patches: Tensor<2>, grids: &[(usize, usize)], layers: usize) -> Result<Vec<Tensor<2>>> {
        let (mut x, segments) = self.embed(patches, grids)?;
        let mut states = vec![x.clone()];
        for block in self.blocks.iter().take(layers) {
            x = block.forward(x, &segments);
            states.push(x.clone());
        }
        Ok(states)
    }

    /// The last block's output without the prefix tokens: one row per patch, images in order.
    /// Only the running state is kept, not every block's output.
    ///
    /// # Shapes
    /// - patches: `[patches, channels * patch^2]`
    /// - output: `[patches, hidden]`
    pub fn features(&self, patches: Tensor<2>, grids: &[(usize, usize)]) -> Result<Tensor<2>> {
        let (mut x, segments) = self.embed(patches, grids)?;
        for block in &self.blocks {
            x = block.forward(x, &segments);
        }
        Ok(drop_prefixes(x, grids, self.config.prefix_tokens))
    }

    /// The packed embeddings of every image and each image's sequence length, after checking the
    /// patches against the grids.
    fn embed(&self, patches: Tensor<2>, grids: &[(usize, usize)]) -> Result<(Tensor<2>, Vec<usize>)> {
        let [count, width] = patches.dims();
        let expected: usize = grids.iter().map(|&(h, w)| h * w).sum();
        if width != self.config.patch_values() || count != expected {
            return Err(Error::Input(format!(
                "RADIO takes [{expected}, {}] patches for these grids, got [{count}, {width}]",
                self.config.patch_values()
            )));
        }
        let prefix = self.config.prefix_tokens;
        let segments = grids.iter().map(|&(h, w)| prefix + h * w).collect();
        Ok((self.patch_generator.forward(patches, grids), segments))
    }
}

/// Each image's rows of a packed sequence without its first `prefix` rows.
fn drop_prefixes(x: Tensor<2>, grids: &[(usize, usize)], prefix: usize) -> Tensor<2> {
    let mut start = 0;
    let mut parts = Vec::with_capacity(grids.len());
    for &(h, w) in grids {
        parts.push(x.clone().narrow(0, start + prefix, h * w));
        start += prefix + h * w;
    }
    Tensor::cat(parts, 0)
}

/// Patch embedding, position table and prefix tokens (`patch_generator`).
#[derive(Module, Debug)]
pub struct PatchGenerator {
    /// A linear layer without bias over flattened `(channel, y, x)` patches.
    pub embedder: Linear,
    /// `[1, grid^2, hidden]`, row-major.
    pub pos_embed: Param<Tensor<3>>,
    /// The CLS and register tokens.
    pub cls_token: ClsToken,
}

impl PatchGenerator {
    /// # Shapes
    /// - patches: `[patches, values]`
    /// - output: `[images * prefix + patches, hidden]`
    fn forward(&self, patches: Tensor<2>, grids: &[(usize, usize)]) -> Tensor<2> {
        let embedded = self.embedder.forward(patches);
        let prefix = self.cls_token.token.val();
        let mut parts = Vec::with_capacity(2 * grids.len());
        let mut start = 0;
        for &(h, w) in grids {
            parts.push(prefix.clone());
            parts.push(embedded.clone().narrow(0, start, h * w) + self.positions(h, w));
            start += h * w;
        }
        Tensor::cat(parts, 0)
    }

    /// The table resized to `max(h, w)` squared (bilinear, `align_corners=False`, no antialias)
    /// and cropped to its top-left `h x w`, row-major.
    ///
    /// # Shapes
    /// - output: `[h * w, hidden]`
    fn positions(&self, h: usize, w: usize) -> Tensor<2> {
        let [_, cells, hidden] = self.pos_embed.dims();
        let side = cells.isqrt();
        let table = self.pos_embed.val().reshape([side, side * hidden]);
        let device = table.device();
        let size = h.max(w);
        let rows = Tensor::<2>::from_data(bilinear_weights(side, size, h), &device);
        let cols = Tensor::<2>::from_data(bilinear_weights(side, size, w), &device);
        // [h, side * hidden] -> [h, hidden, side] x [side, w] -> [h, hidden, w]
        let by_rows = rows.matmul(table).reshape([h, side, hidden]).swap_dims(1, 2);
        let both = by_rows.matmul(cols.transpose().unsqueeze::<3>());
        both.swap_dims(1, 2).reshape([h * w, hidden])
    }
}

/// The first `keep` rows of the matrix that resizes `n_in` samples to `n_out` with PyTorch's
/// bilinear rule (`align_corners=False`, no antialias): `[keep, n_in]`.
fn bilinear_weights(n_in: usize, n_out: usize, keep: usize) -> TensorData {
    let mut weights = vec![0f32; keep * n_in];
    let scale = n_in as f32 / n_out as f32;
    for dst in 0..keep {
        let src = ((dst as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let lambda = src - i0 as f32;
        weights[dst * n_in + i0] += 1.0 - lambda;
        weights[dst * n_in + i1] += lambda;
    }
    TensorData::new(weights, [keep, n_in])
}

/// The CLS and register tokens (`cls_token.token`).
#[derive(Module, Debug)]
pub struct ClsToken {
    /// `[prefix, hidden]`
    pub token: Param<Tensor<2>>,
}

/// A per-channel scale of a residual branch.
#[derive(Module, Debug)]
pub struct LayerScale {
    /// `[hidden]`
    pub lambda1: Param<Tensor<1>>,
}

impl LayerScale {
    fn forward(scale: &Option<LayerScale>, x: Tensor<2>) -> Tensor<2> {
        match scale {
            Some(scale) => x * scale.lambda1.val().unsqueeze(),
            None => x,
        }
    }
}

/// One pre-norm block.
#[derive(Module, Debug)]
pub struct RadioBlock {
    /// Norm before attention.
    pub norm1: LayerNorm,
    /// Self-attention within each image.
    pub attn: RadioAttention,
    /// Scale of the attention branch, if the checkpoint has one.
    pub layer_scale1: Option<LayerScale>,
    /// Norm before the MLP.
    pub norm2: LayerNorm,
    /// Feed-forward block.
    pub mlp: RadioMlp,
    /// Scale of the MLP branch, if the checkpoint has one.
    pub layer_scale2: Option<LayerScale>,
}

impl RadioBlock {
    fn forward(&self, x: Tensor<2>, segments: &[usize]) -> Tensor<2> {
        let attended = self.attn.forward(self.norm1.forward(x.clone()), segments);
        let x = x + LayerScale::forward(&self.layer_scale1, attended);
        let mlp = self.mlp.forward(self.norm2.forward(x.clone()));
        x + LayerScale::forward(&self.layer_scale2, mlp)
    }
}

/// Multi-head attention with a fused `qkv` projection (rows q, k, v) and an output projection.
#[derive(Module, Debug)]
pub struct RadioAttention {
    /// `[3 hidden, hidden]`
    pub qkv: Linear,
    /// `[hidden, hidden]`
    pub proj: Linear,
    #[module(skip)]
    num_heads: usize,
}

impl RadioAttention {
    fn forward(&self, x: Tensor<2>, segments: &[usize]) -> Tensor<2> {
        let [rows, hidden] = x.dims();
        let head_dim = hidden / self.num_heads;
        let qkv = self.qkv.forward(x);
        let heads = |i: usize| qkv.clone().narrow(1, i * hidden, hidden).reshape([rows, self.num_heads, head_dim]);
        let out = segment_attention(heads(0), heads(1), heads(2), segments, (head_dim as f64).powf(-0.5));
        self.proj.forward(out.reshape([rows, hidden]))
    }
}

/// `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct RadioMlp {
    /// `[intermediate, hidden]`
    pub fc1: Linear,
    /// `[hidden, intermediate]`
    pub fc2: Linear,
    #[module(skip)]
    activation: Activation,
}

impl RadioMlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.activation.forward(self.fc1.forward(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_weights_follow_pytorch() {
        // Same size: the identity.
        let same = bilinear_weights(3, 3, 3).try_to_vec::<f32>().unwrap();
        assert_eq!(same, [1., 0., 0., 0., 1., 0., 0., 0., 1.]);
        // 2 -> 4: src = (dst + 0.5) / 2 - 0.5 = -0.25 (clamped 0), 0.25, 0.75, 1.25 (edge).
        let up = bilinear_weights(2, 4, 4).try_to_vec::<f32>().unwrap();
        assert_eq!(up, [1., 0., 0.75, 0.25, 0.25, 0.75, 0., 1.]);
        // Only the first rows when cropping.
        assert_eq!(bilinear_weights(2, 4, 1).shape().to_vec(), [1, 2]);
    }
}
