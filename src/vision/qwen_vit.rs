//! The Qwen-VL vision towers, one configurable module: Qwen2.5-VL's
//! (`Qwen2_5_VisionTransformerPretrainedModel`: RMSNorm, SwiGLU, window attention in all but the
//! full-attention blocks, tokens permuted into window order and back) and Qwen3-VL's
//! (`Qwen3VLVisionModel`: LayerNorm, tanh-GELU MLP, a learned position table interpolated onto
//! the grid, DeepStack mergers). Both embed `temporal x patch x patch` patches with one
//! projection, rotate q and k by each patch's (row, column), attend within each frame (or
//! window) only, and merge `merge x merge` patches into one token for the decoder.

use burn::module::{Initializer, Module, Param};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use super::qwen_grid::{self, VisualGrid};
use crate::error::{Error, Result};
use crate::nn::rope::{axial_tables, rotate_half};
use crate::nn::{
    Activation, GatedMlp, GatedMlpConfig, Linear, LinearConfig, Norm, NormConfig, NormKind, segment_attention,
};
use crate::text::decoder::Embedding;

/// Epsilon of every norm of the towers (hard-coded in transformers).
const NORM_EPS: f64 = 1e-6;
/// Base of the vision rotary embedding.
const ROPE_THETA: f32 = 10_000.0;

/// Qwen2.5-VL's attention windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowConfig {
    /// Side of a window in pixels (`window_size`).
    pub size: usize,
    /// Blocks that attend over whole frames instead (`fullatt_block_indexes`).
    pub full_attention_blocks: Vec<usize>,
}

/// Shape and options of a Qwen-VL vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVisionConfig {
    /// Blocks (`depth`).
    pub depth: usize,
    /// Width of the tower.
    pub hidden_size: usize,
    /// Inner width of the MLPs.
    pub intermediate_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Colour channels.
    pub in_channels: usize,
    /// Side of a patch in pixels.
    pub patch_size: usize,
    /// Frames per temporal patch (a still image is repeated to fill one).
    pub temporal_patch_size: usize,
    /// Patches per side of a merged token.
    pub spatial_merge_size: usize,
    /// Width of the merged tokens (the decoder's).
    pub out_hidden_size: usize,
    /// Activation of the block MLPs.
    pub hidden_act: Activation,
    /// Norm of the blocks and of the final merger's input (RMSNorm: Qwen2.5-VL; LayerNorm: Qwen3-VL).
    pub norm: NormKind,
    /// SwiGLU MLPs with biases (Qwen2.5-VL), else `fc2(act(fc1(x)))` (Qwen3-VL).
    pub gated_mlp: bool,
    /// Whether the patch projection has a bias (Qwen3-VL).
    pub patch_bias: bool,
    /// Window attention (Qwen2.5-VL).
    pub windows: Option<WindowConfig>,
    /// Side of the learned position table (`sqrt(num_position_embeddings)`, Qwen3-VL).
    pub position_table_side: Option<usize>,
    /// Blocks whose output also goes through a merger of its own (Qwen3-VL's DeepStack).
    pub deepstack_indexes: Vec<usize>,
}

impl QwenVisionConfig {
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Values per flattened patch: `channels x temporal x patch x patch`.
    pub fn patch_values(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        let (c, i) = (self.hidden_size as u128, self.intermediate_size as u128);
        let merged = c.saturating_mul((self.spatial_merge_size as u128).saturating_pow(2));
        let block = c.saturating_mul(c).saturating_mul(4).saturating_add(c.saturating_mul(i).saturating_mul(2));
        let merger = merged.saturating_mul(merged).saturating_add(merged.saturating_mul(self.out_hidden_size as u128));
        let mergers = merger.saturating_mul(1 + self.deepstack_indexes.len() as u128);
        block
            .saturating_mul(self.depth as u128)
            .saturating_add(c.saturating_mul(self.patch_values() as u128))
            .saturating_add(mergers)
    }

    /// Creates the tower (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> QwenVisionTransformer {
        let c = self.hidden_size;
        let norm = NormConfig { kind: self.norm, d_model: c, eps: NORM_EPS };
        let block = || VisionBlock {
            norm1: norm.init(device),
            norm2: norm.init(device),
            attn: VisionAttention {
                qkv: LinearConfig::new(c, 3 * c, true).init(device),
                proj: LinearConfig::new(c, c, true).init(device),
                num_heads: self.num_heads,
            },
            mlp: if self.gated_mlp {
                VisionMlp::Gated(
                    GatedMlpConfig {
                        hidden_size: c,
                        intermediate_size: self.intermediate_size,
                        activation: self.hidden_act,
                        bias: true,
                        quantization: None,
                    }
                    .init(device),
                )
            } else {
                VisionMlp::Plain(PlainMlp {
                    linear_fc1: LinearConfig::new(c, self.intermediate_size, true).init(device),
                    linear_fc2: LinearConfig::new(self.intermediate_size, c, true).init(device),
                    activation: self.hidden_act,
                })
            },
        };
        let merged = c * self.spatial_merge_size * self.spatial_merge_size;
        let merger = |postshuffle: bool, kind: NormKind| PatchMerger {
            norm: NormConfig { kind, d_model: if postshuffle { merged } else { c }, eps: NORM_EPS }.init(device),
            linear_fc1: LinearConfig::new(merged, merged, true).init(device),
            linear_fc2: LinearConfig::new(merged, self.out_hidden_size, true).init(device),
            postshuffle,
            merged,
        };
        let [p, t] = [self.patch_size, self.temporal_patch_size];
        QwenVisionTransformer {
            patch_embed: PatchEmbed {
                proj: PatchProjection {
                    weight: Initializer::Zeros.init([c, self.in_channels, t, p, p], device),
                    bias: self.patch_bias.then(|| Initializer::Zeros.init([c], device)),
                },
            },
            pos_embed: self
                .position_table_side
                .map(|side| Embedding { weight: Initializer::Zeros.init([side * side, c], device) }),
            blocks: (0..self.depth).map(|_| block()).collect(),
            merger: merger(false, self.norm),
            deepstack_merger_list: self.deepstack_indexes.iter().map(|_| merger(true, NormKind::LayerNorm)).collect(),
            config: self.clone(),
        }
    }
}

/// What the tower gives the decoder.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// The last block's output, `[patches, hidden]`, in the tower's order (window order in
    /// Qwen2.5-VL): for checking a port stage by stage.
    pub hidden_state: Tensor<2>,
    /// Merged tokens in prompt order, `[patches / merge^2, out_hidden]`.
    pub embeds: Tensor<2>,
    /// Qwen3-VL: one `[patches / merge^2, out_hidden]` per DeepStack block, in prompt order.
    pub deepstack: Vec<Tensor<2>>,
}

/// A Qwen-VL vision tower.
#[derive(Module, Debug)]
pub struct QwenVisionTransformer {
    /// The patch projection (a Conv3d whose kernel equals its stride).
    pub patch_embed: PatchEmbed,
    /// The learned position table (Qwen3-VL).
    pub pos_embed: Option<Embedding>,
    /// The blocks.
    pub blocks: Vec<VisionBlock>,
    /// Merges `merge x merge` patches into one decoder token.
    pub merger: PatchMerger,
    /// DeepStack mergers (Qwen3-VL), one per listed block.
    pub deepstack_merger_list: Vec<PatchMerger>,
    #[module(skip)]
    config: QwenVisionConfig,
}

impl QwenVisionTransformer {
    /// The configuration the tower was built from.
    pub fn config(&self) -> &QwenVisionConfig {
        &self.config
    }

    /// Encodes the patches of several images or videos.
    ///
    /// # Shapes
    /// - pixel_values: `[patches, channels * temporal * patch * patch]`, every grid's patches in
    ///   merge-block order, grid after grid
    pub fn forward(&self, pixel_values: Tensor<2>, grids: &[VisualGrid]) -> Result<VisionOutput> {
        let config = &self.config;
        let merge = config.spatial_merge_size;
        let units = merge * merge;
        let [patches, values] = pixel_values.dims();
        let expected: usize = grids.iter().map(VisualGrid::patches).sum();
        if values != config.patch_values() || patches != expected {
            return Err(Error::Input(format!(
                "{patches} patches of {values} values for grids of {expected} patches of {}",
                config.patch_values()
            )));
        }
        if grids.iter().any(|grid| grid.t == 0 || grid.h % merge != 0 || grid.w % merge != 0) {
            return Err(Error::Input(format!("patch grids {grids:?} are not whole {merge}x{merge} blocks")));
        }
        let device = pixel_values.device();
        let mut x = self.patch_embed.forward(pixel_values); // [patches, hidden]
        if let (Some(table), Some(side)) = (&self.pos_embed, config.position_table_side) {
            x = x + interpolated_positions(table, side, grids, merge, &device);
        }
        let mut positions = qwen_grid::position_ids(grids, merge);
        let window = config
            .windows
            .as_ref()
            .map(|windows| qwen_grid::window_index(grids, merge, windows.size, config.patch_size));
        if let Some((order, _)) = &window {
            // Merged units (groups of merge^2 rows) into window order.
            x = select_units(x, order, units);
            positions = order.iter().flat_map(|&unit| positions[unit * units..(unit + 1) * units].to_vec()).collect();
        }
        let (cos, sin) = rotary_tables(&positions, config.head_dim(), &device);
        let frames = qwen_grid::frame_segments(grids);
        let mut deepstack = Vec::new();
        for (index, block) in self.blocks.iter().enumerate() {
            let segments = match (&window, &config.windows) {
                (Some((_, lengths)), Some(windows)) if !windows.full_attention_blocks.contains(&index) => lengths,
                _ => &frames,
            };
            x = block.forward(x, &cos, &sin, segments);
            if let Some(k) = config.deepstack_indexes.iter().position(|&i| i == index) {
                deepstack.push(self.deepstack_merger_list[k].forward(x.clone()));
            }
        }
        let mut embeds = self.merger.forward(x.clone());
        if let Some((order, _)) = &window {
            let back = qwen_grid::inverse(order);
            embeds = select_units(embeds, &back, 1);
            deepstack = deepstack.into_iter().map(|features| select_units(features, &back, 1)).collect();
        }
        Ok(VisionOutput { hidden_state: x, embeds, deepstack })
    }
}

/// Rows of `x` regrouped: unit `i` of the result is unit `order[i]` of `x`, a unit being `size`
/// consecutive rows.
fn select_units(x: Tensor<2>, order: &[usize], size: usize) -> Tensor<2> {
    let [rows, width] = x.dims();
    let device = x.device();
    let indices: Vec<i64> = order.iter().map(|&unit| unit as i64).collect();
    let indices = Tensor::<1, Int>::from_data(TensorData::new(indices, [order.len()]), &device);
    // [rows, width] -> [rows / size, size * width]
    x.reshape([rows / size, size * width]).select(0, indices).reshape([rows, width])
}

/// The learned position table interpolated onto every grid, `[patches, hidden]`.
fn interpolated_positions(
    table: &Embedding,
    side: usize,
    grids: &[VisualGrid],
    merge: usize,
    device: &Device,
) -> Tensor<2> {
    let (taps, weights) = qwen_grid::interpolation_taps(grids, side, merge);
    let patches = taps.len();
    let indices: Vec<i64> = taps.iter().flatten().map(|&i| i as i64).collect();
    let indices = Tensor::<1, Int>::from_data(TensorData::new(indices, [patches * 4]), device);
    let weights: Vec<f32> = weights.into_iter().flatten().collect();
    let weights: Tensor<3> = crate::nn::f32_tensor(TensorData::new(weights, [patches, 4, 1]), device);
    let rows = table.weight.val();
    let [_, hidden] = rows.dims();
    let dtype = rows.dtype();
    // [patches * 4, hidden] -> [patches, 4, hidden], weighted in f32 and summed over the taps
    let gathered = rows.select(0, indices).reshape([patches, 4, hidden]).cast(DType::F32);
    (gathered * weights).sum_dim(1).reshape([patches, hidden]).cast(dtype)
}

/// Cosines and sines of the vision RoPE, `[patches, 1, head_dim]` in f32: the first quarter of
/// the frequencies rotate by the patch's row, the next by its column, and the half repeats.
fn rotary_tables(positions: &[[usize; 2]], head_dim: usize, device: &Device) -> (Tensor<3>, Tensor<3>) {
    let spatial = head_dim / 2;
    let inv_freq: Vec<f32> =
        (0..spatial).step_by(2).map(|i| 1.0 / ROPE_THETA.powf(i as f32 / spatial as f32)).collect();
    axial_tables(positions, &inv_freq, &inv_freq, device)
}

/// Holds the patch projection under the checkpoint's name.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// A `Conv3d(channels, hidden, kernel = stride = (temporal, patch, patch))`.
    pub proj: PatchProjection,
}

impl PatchEmbed {
    /// # Shapes
    /// - pixel_values: `[patches, channels * temporal * patch * patch]`
    /// - output: `[patches, hidden]`
    fn forward(&self, pixel_values: Tensor<2>) -> Tensor<2> {
        self.proj.forward(pixel_values)
    }
}

/// A convolution whose kernel equals its stride, over patches already flattened in the kernel's
/// element order `(channel, time, row, column)`: one matrix product.
#[derive(Module, Debug)]
pub struct PatchProjection {
    /// `[hidden, channels, temporal, patch, patch]`
    pub weight: Param<Tensor<5>>,
    /// `[hidden]` (Qwen3-VL)
    pub bias: Option<Param<Tensor<1>>>,
}

impl PatchProjection {
    fn forward(&self, patches: Tensor<2>) -> Tensor<2> {
        let [hidden, channels, temporal, patch, _] = self.weight.dims();
        let weight = self.weight.val().reshape([hidden, channels * temporal * patch * patch]);
        let dtype = weight.dtype();
        burn::tensor::module::linear(patches.cast(dtype), weight.transpose(), self.bias.as_ref().map(|b| b.val()))
    }
}

/// One pre-norm block.
#[derive(Module, Debug)]
pub struct VisionBlock {
    /// Norm before attention.
    pub norm1: Norm,
    /// Norm before the MLP.
    pub norm2: Norm,
    /// Self-attention within segments.
    pub attn: VisionAttention,
    /// Feed-forward block.
    pub mlp: VisionMlp,
}

impl VisionBlock {
    fn forward(&self, x: Tensor<2>, cos: &Tensor<3>, sin: &Tensor<3>, segments: &[usize]) -> Tensor<2> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x), cos, sin, segments);
        x.clone() + self.mlp.forward(self.norm2.forward(x))
    }
}

/// Multi-head attention with a fused q/k/v projection and the vision RoPE, block-diagonal over
/// segments (`Qwen2_5_VLVisionAttention`, `Qwen3VLVisionAttention`).
#[derive(Module, Debug)]
pub struct VisionAttention {
    /// `[3 hidden, hidden]`: q, k, v one after the other.
    pub qkv: Linear,
    /// Output projection.
    pub proj: Linear,
    #[module(skip)]
    num_heads: usize,
}

impl VisionAttention {
    /// # Shapes
    /// - x and output: `[patches, hidden]`; cos, sin: `[patches, 1, head_dim]`
    fn forward(&self, x: Tensor<2>, cos: &Tensor<3>, sin: &Tensor<3>, segments: &[usize]) -> Tensor<2> {
        let [patches, hidden] = x.dims();
        let head_dim = hidden / self.num_heads;
        let dtype = x.dtype();
        // [patches, 3 hidden] -> [patches, 3, heads, head_dim]
        let qkv = self.qkv.forward(x).reshape([patches, 3, self.num_heads, head_dim]);
        let part = |i: usize| qkv.clone().narrow(1, i, 1).reshape([patches, self.num_heads, head_dim]);
        // RoPE in f32, as transformers' apply_rotary_pos_emb_vision.
        let rotate = |t: Tensor<3>| {
            let t = t.cast(DType::F32);
            (t.clone() * cos.clone() + rotate_half(t) * sin.clone()).cast(dtype)
        };
        let (q, k, v) = (rotate(part(0)), rotate(part(1)), part(2));
        let out = segment_attention(q, k, v, segments, (head_dim as f64).powf(-0.5));
        self.proj.forward(out.reshape([patches, hidden]))
    }
}

/// The MLP of a block.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per block: its size does not matter
pub enum VisionMlp {
    /// `down(act(gate(x)) * up(x))` with biases (Qwen2.5-VL).
    Gated(GatedMlp),
    /// `fc2(act(fc1(x)))` (Qwen3-VL).
    Plain(PlainMlp),
}

impl VisionMlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            VisionMlp::Gated(mlp) => mlp.forward(x.unsqueeze_dim::<3>(0)).squeeze_dim::<2>(0),
            VisionMlp::Plain(mlp) => mlp.linear_fc2.forward(mlp.activation.forward(mlp.linear_fc1.forward(x))),
        }
    }
}

/// `linear_fc2(act(linear_fc1(x)))`.
#[derive(Module, Debug)]
pub struct PlainMlp {
    /// `[intermediate, hidden]`
    pub linear_fc1: Linear,
    /// `[hidden, intermediate]`
    pub linear_fc2: Linear,
    /// Activation between them.
    #[module(skip)]
    pub activation: Activation,
}

/// Merges each `merge x merge` block of patches (consecutive rows) into one decoder token:
/// norm, concatenate, `fc2(gelu(fc1(x)))`. The final merger norms each patch before
/// concatenating; Qwen3-VL's DeepStack mergers norm after (`use_postshuffle_norm`).
#[derive(Module, Debug)]
pub struct PatchMerger {
    /// Norm over a patch (`hidden`) or over a merged block (`merge^2 hidden`).
    pub norm: Norm,
    /// `[merged, merged]`
    pub linear_fc1: Linear,
    /// `[out_hidden, merged]`
    pub linear_fc2: Linear,
    #[module(skip)]
    postshuffle: bool,
    #[module(skip)]
    merged: usize,
}

impl PatchMerger {
    /// # Shapes
    /// - x: `[patches, hidden]`
    /// - output: `[patches / merge^2, out_hidden]`
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [patches, hidden] = x.dims();
        let tokens = patches * hidden / self.merged;
        let merged = if self.postshuffle {
            self.norm.forward(x.reshape([tokens, self.merged]))
        } else {
            self.norm.forward(x).reshape([tokens, self.merged])
        };
        self.linear_fc2.forward(burn::tensor::activation::gelu(self.linear_fc1.forward(merged)))
    }
}
