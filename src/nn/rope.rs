//! Rotary position embedding in the "rotate half" convention of HuggingFace checkpoints
//! (transformers' `rotate_half` / `apply_rotary_pos_emb`). burn's `RotaryEncoding` rotates
//! interleaved pairs instead, which would need permuted q/k weights.

use burn::tensor::{Device, Tensor, TensorData};

/// Rotary embedding for one head size and base frequency (`rope_theta`).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    head_dim: usize,
    /// `1 / theta^(2i / head_dim)` for `i < head_dim / 2`, in f32 as transformers computes it.
    inv_freq: Vec<f32>,
}

impl RotaryEmbedding {
    /// `head_dim` must be even.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        Self { head_dim, inv_freq }
    }

    /// Cosine and sine tables for the given positions: `batch` rows of `seq_len` positions each.
    pub fn tables(&self, positions: &[Vec<usize>], device: &Device) -> RopeTables {
        let batch = positions.len();
        let seq_len = positions.first().map_or(0, Vec::len);
        let mut cos = Vec::with_capacity(batch * seq_len * self.head_dim);
        let mut sin = Vec::with_capacity(batch * seq_len * self.head_dim);
        for row in positions {
            for &position in row {
                for _half in 0..2 {
                    for &freq in &self.inv_freq {
                        let angle = position as f32 * freq;
                        cos.push(angle.cos());
                        sin.push(angle.sin());
                    }
                }
            }
        }
        // [batch, 1, seq_len, head_dim]: broadcast over heads
        let shape = [batch, 1, seq_len, self.head_dim];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}

/// Cosines and sines for the positions of one forward pass, with the half-size frequencies repeated
/// twice (`cat(freqs, freqs)`), shared by every layer.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// `[batch, 1, seq_len, head_dim]`
    cos: Tensor<4>,
    /// `[batch, 1, seq_len, head_dim]`
    sin: Tensor<4>,
}

impl RopeTables {
    /// Rotates queries or keys: `x * cos + rotate_half(x) * sin`.
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq_len, head_dim]`
    /// - output: like `x`
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        x.clone() * self.cos.clone().cast(dtype) + rotate_half(x) * self.sin.clone().cast(dtype)
    }
}

/// `cat(-x[..., d/2:], x[..., :d/2])` over the last dimension.
fn rotate_half(x: Tensor<4>) -> Tensor<4> {
    let [_, _, _, head_dim] = x.dims();
    let half = head_dim / 2;
    let first = x.clone().narrow(3, 0, half);
    let second = x.narrow(3, half, half);
    Tensor::cat(vec![second.neg(), first], 3)
}
