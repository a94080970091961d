//! Rotary position embedding in the "rotate half" convention of HuggingFace checkpoints
//! (transformers' `rotate_half` / `apply_rotary_pos_emb`). burn's `RotaryEncoding` rotates
//! interleaved pairs instead, which would need permuted q/k weights.

use burn::tensor::{Device, Tensor, TensorData};

/// How the rotary frequencies are stretched for contexts longer than the model was trained on
/// (transformers' `ROPE_INIT_FUNCTIONS` in `modeling_rope_utils.py`). `None` is plain RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: "default"`).
    #[default]
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The stretch factor.
        factor: f64,
    },
    /// Dynamic NTK: once a forward pass reaches past `max_position_embeddings`, the base grows with
    /// the sequence length (recomputed per forward pass, as transformers does; keys already in the
    /// cache keep the rotation they were written with).
    Dynamic {
        /// The stretch factor.
        factor: f64,
    },
    /// Llama 3.1's band-wise scaling: low frequencies divided by `factor`, high ones kept, a smooth
    /// blend between.
    Llama3 {
        /// The stretch factor.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context the model was pre-trained on.
        original_max_position_embeddings: f64,
    },
    /// YaRN: interpolation ramped in by rotation count, and cos/sin scaled by `attention_factor`.
    Yarn {
        /// The stretch factor.
        factor: f64,
        /// The context the model was pre-trained on.
        original_max_position_embeddings: f64,
        /// Rotations above which frequencies are kept (default 32).
        beta_fast: f64,
        /// Rotations below which frequencies are interpolated (default 1).
        beta_slow: f64,
        /// Scale of cos and sin (default from the factor, see [`yarn_attention_factor`]).
        attention_factor: f64,
        /// Whether the ramp's ends are rounded to whole dimensions (default true).
        truncate: bool,
    },
}

/// YaRN's default attention factor: `0.1 ln(factor) + 1`, or the ratio of two such terms when
/// the config gives `mscale` and `mscale_all_dim` (DeepSeek's spelling).
pub fn yarn_attention_factor(factor: f64, mscale: Option<f64>, mscale_all_dim: Option<f64>) -> f64 {
    let get_mscale = |scale: f64, mscale: f64| if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 };
    match (mscale, mscale_all_dim) {
        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => get_mscale(factor, m) / get_mscale(factor, all),
        _ => get_mscale(factor, 1.0),
    }
}

/// Which of the three position rows (temporal, height, width) each rotary frequency takes in
/// Qwen-VL's multimodal RoPE (transformers' `mrope_section`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultimodalRope {
    /// Frequencies per row (summing to `head_dim / 2`).
    pub section: [usize; 3],
    /// Qwen3-VL: rows alternate t, h, w over the first `3 * section` frequencies; Qwen2.5-VL:
    /// contiguous blocks of `section[0]`, `section[1]`, `section[2]` frequencies.
    pub interleaved: bool,
}

impl MultimodalRope {
    /// Every frequency reads the temporal row: for text, whose three rows are equal, plain RoPE.
    pub const TEXT: Self = Self { section: [usize::MAX, 0, 0], interleaved: false };

    /// The row (0 temporal, 1 height, 2 width) frequency `j` takes.
    pub fn row(&self, j: usize) -> usize {
        let [t, h, w] = self.section;
        if self.interleaved {
            match j % 3 {
                1 if j < 3 * h => 1,
                2 if j < 3 * w => 2,
                _ => 0,
            }
        } else if j < t {
            0
        } else if j < t.saturating_add(h) {
            1
        } else {
            2
        }
    }
}

/// Rotary embedding for one head size, base frequency (`rope_theta`) and scaling.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    max_position_embeddings: usize,
    /// The frequencies for sequences within `max_position_embeddings`, in f32 as transformers
    /// computes them: `1 / theta^(2i / head_dim)` for `i < head_dim / 2`, then scaled.
    inv_freq: Vec<f32>,
    /// Scale of cos and sin (YaRN's attention factor; 1 otherwise).
    attention_scaling: f32,
}

impl RotaryEmbedding {
    /// `head_dim` must be even.
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling, max_position_embeddings: usize) -> Self {
        let base = default_inv_freq(head_dim, theta as f32);
        let (inv_freq, attention_scaling) = match scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor as f32).collect(), 1.0),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, low, high) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
                let original = original_max_position_embeddings as f32;
                let (low_freq_wavelen, high_freq_wavelen) = (original / low, original / high);
                let scaled = base.iter().map(|&freq| {
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    let kept = if wavelen > low_freq_wavelen { freq / factor } else { freq };
                    if wavelen < high_freq_wavelen || wavelen > low_freq_wavelen {
                        kept
                    } else {
                        let smooth = (original / wavelen - low) / (high - low);
                        (1.0 - smooth) * kept / factor + smooth * kept
                    }
                });
                (scaled.collect(), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let dim = head_dim as f64;
                let correction = |rotations: f64| {
                    dim * (original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let (low, span) = (low as f32, (high - low) as f32);
                let scaled = (0..head_dim / 2).map(|i| {
                    let position_freq = (theta as f32).powf((2 * i) as f32 / head_dim as f32);
                    let extrapolation = 1.0 - ((i as f32 - low) / span).clamp(0.0, 1.0);
                    let interpolated = 1.0 / (factor as f32 * position_freq);
                    interpolated * (1.0 - extrapolation) + (1.0 / position_freq) * extrapolation
                });
                (scaled.collect(), attention_factor as f32)
            }
        };
        Self { head_dim, theta, scaling, max_position_embeddings, inv_freq, attention_scaling }
    }

    /// The frequencies a forward pass whose largest position is `max_position` uses.
    pub fn inv_freq(&self, max_position: usize) -> Vec<f32> {
        let seq_len = max_position + 1;
        match self.scaling {
            RopeScaling::Dynamic { factor } if seq_len > self.max_position_embeddings => {
                let (factor, dim) = (factor as f32, self.head_dim as f32);
                let growth = factor * seq_len as f32 / self.max_position_embeddings as f32 - (factor - 1.0);
                default_inv_freq(self.head_dim, self.theta as f32 * growth.powf(dim / (dim - 2.0)))
            }
            _ => self.inv_freq.clone(),
        }
    }

    /// Cosine and sine tables for the given positions: `batch` rows of `seq_len` positions each.
    pub fn tables(&self, positions: &[Vec<usize>], device: &Device) -> RopeTables {
        let positions: Vec<Vec<[usize; 3]>> =
            positions.iter().map(|row| row.iter().map(|&p| [p, p, p]).collect()).collect();
        self.multimodal_tables(&positions, MultimodalRope::TEXT, device)
    }

    /// Cosine and sine tables for three position rows per token (temporal, height, width), each
    /// frequency taking the row `layout` assigns it (Qwen-VL's multimodal RoPE). Text tokens have
    /// three equal rows, which is plain RoPE.
    pub fn multimodal_tables(
        &self,
        positions: &[Vec<[usize; 3]>],
        layout: MultimodalRope,
        device: &Device,
    ) -> RopeTables {
        let batch = positions.len();
        let seq_len = positions.first().map_or(0, Vec::len);
        let largest = positions.iter().flatten().flat_map(|rows| rows.iter().copied()).max().unwrap_or(0);
        let inv_freq = self.inv_freq(largest);
        let mut cos = Vec::with_capacity(batch * seq_len * self.head_dim);
        let mut sin = Vec::with_capacity(batch * seq_len * self.head_dim);
        for row in positions {
            for rows in row {
                // The first half's sines negated: `rotate_half`'s sign, folded into the table.
                for sign in [-1.0, 1.0] {
                    for (j, &freq) in inv_freq.iter().enumerate() {
                        let angle = rows[layout.row(j)] as f32 * freq;
                        cos.push(angle.cos() * self.attention_scaling);
                        sin.push(sign * angle.sin() * self.attention_scaling);
                    }
                }
            }
        }
        // [batch, 1, seq_len, head_dim]: broadcast over heads
        let shape = [batch, 1, seq_len, self.head_dim];
        RopeTables {
            cos: super::f32_tensor(TensorData::new(cos, shape), device),
            sin: super::f32_tensor(TensorData::new(sin, shape), device),
        }
    }
}

/// Cosines and sines of a 2D (axial) rotary embedding for the vision towers, `[patches, 1,
/// 2 * (row_freqs + col_freqs)]` in f32: each patch's row turns `row_freqs`, its column
/// `col_freqs`, and the half repeats (rotate-half convention).
pub(crate) fn axial_tables(
    positions: &[[usize; 2]],
    row_freqs: &[f32],
    col_freqs: &[f32],
    device: &Device,
) -> (Tensor<3>, Tensor<3>) {
    let width = 2 * (row_freqs.len() + col_freqs.len());
    let mut cos = Vec::with_capacity(positions.len() * width);
    let mut sin = Vec::with_capacity(positions.len() * width);
    for &[row, col] in positions {
        let angles: Vec<f32> =
            row_freqs.iter().map(|&f| row as f32 * f).chain(col_freqs.iter().map(|&f| col as f32 * f)).collect();
        for _half in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos()));
            sin.extend(angles.iter().map(|a| a.sin()));
        }
    }
    let shape = [positions.len(), 1, width];
    (super::f32_tensor(TensorData::new(cos, shape), device), super::f32_tensor(TensorData::new(sin, shape), device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multimodal_rope_rows_follow_transformers_layouts() {
        let rows = |layout: MultimodalRope, n: usize| (0..n).map(|j| layout.row(j)).collect::<Vec<_>>();
        // Qwen2.5-VL: contiguous sections.
        assert_eq!(rows(MultimodalRope { section: [2, 3, 3], interleaved: false }, 8), [0, 0, 1, 1, 1, 2, 2, 2]);
        // Qwen3-VL: t, h, w interleaved over 3 x 5 frequencies, then t.
        let interleaved = rows(MultimodalRope { section: [6, 5, 5], interleaved: true }, 16);
        assert_eq!(interleaved, [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
        assert!(rows(MultimodalRope::TEXT, 8).iter().all(|&row| row == 0));
    }
}

/// `1 / base^(2i / head_dim)` for `i < head_dim / 2`, in f32.
fn default_inv_freq(head_dim: usize, base: f32) -> Vec<f32> {
    (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect()
}

/// Cosines and sines for the positions of one forward pass, with the half-size frequencies repeated
/// twice (`cat(freqs, freqs)`), shared by every layer. The sines of the first half are stored
/// negated, so that `rotate_half(x) * sin` is the halves of `x` swapped times this table.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// `[batch, 1, seq_len, head_dim]`
    cos: Tensor<4>,
    /// `[batch, 1, seq_len, head_dim]`: `cat(-sin, sin)`
    sin: Tensor<4>,
}

impl RopeTables {
    /// Rotates queries or keys: `x * cos + rotate_half(x) * sin`, computed as `x * cos +
    /// swap_halves(x) * cat(-sin, sin)` (the same products, so the same values): swapping the
    /// halves is a flip of a `[2, head_dim / 2]` view, which copies nothing on the CPU and costs
    /// one kernel on a GPU where `rotate_half`'s concatenation costs two.
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq_len, head_dim]`
    /// - output: like `x`
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, heads, seq_len, head_dim] = x.dims();
        let dtype = x.dtype();
        let halves = |t: Tensor<4>| {
            let rows = t.dims()[1];
            let t = if t.dtype() == dtype { t } else { t.cast(dtype) };
            t.reshape([batch, rows, seq_len, 2, head_dim / 2])
        };
        let (cos, sin) = (halves(self.cos.clone()), halves(self.sin.clone()));
        let x = halves(x);
        let out = x.clone() * cos + x.flip([3]) * sin;
        out.reshape([batch, heads, seq_len, head_dim])
    }

    /// The tables in `dtype` (computed in f32): cast once per forward pass, not on every layer's
    /// queries and keys.
    pub fn in_dtype(self, dtype: burn::tensor::DType) -> Self {
        if self.cos.dtype() == dtype {
            return self;
        }
        Self { cos: self.cos.cast(dtype), sin: self.sin.cast(dtype) }
    }
}

/// `cat(-x[..., d/2:], x[..., :d/2])` over the last dimension.
pub(crate) fn rotate_half<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let head_dim = x.dims()[D - 1];
    let half = head_dim / 2;
    let first = x.clone().narrow(D - 1, 0, half);
    let second = x.narrow(D - 1, half, half);
    Tensor::cat(vec![second.neg(), first], D - 1)
}
