//! A preallocated key/value cache for a batch of sequences, and the positions and attention mask
//! that follow from it.
//!
//! All rows of a batch share one write position; shorter prompts are left-padded. The cache knows
//! each row's padding, so it derives each token's rotary position (padding does not count) and hides
//! padding keys from every query.

use burn::tensor::{Bool, DType, Device, Tensor, TensorData};

use crate::error::{Error, Result};

/// Keys and values of every decoder layer, written in place as tokens arrive.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    left_padding: Vec<usize>,
    capacity: usize,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    /// An empty cache for `batch` sequences of up to `capacity` tokens each (prompt and generated
    /// tokens together). Memory is allocated on the first forward pass, in the activations' dtype.
    pub fn new(num_layers: usize, batch: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            left_padding: vec![0; batch],
            capacity,
            len: 0,
            kv_heads,
            head_dim,
        }
    }

    /// Declares how many padding tokens each row starts with (prompts of different lengths,
    /// left-padded to the same length). Must be called before the first forward pass.
    pub fn with_left_padding(mut self, left_padding: Vec<usize>) -> Result<Self> {
        if left_padding.len() != self.left_padding.len() {
            return Err(Error::Input(format!(
                "{} padding lengths for a batch of {}",
                left_padding.len(),
                self.left_padding.len()
            )));
        }
        self.left_padding = left_padding;
        Ok(self)
    }

    /// Tokens written so far (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens a row can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sequences in the batch.
    pub fn batch_size(&self) -> usize {
        self.left_padding.len()
    }

    /// Padding tokens at the start of each row.
    pub fn left_padding(&self) -> &[usize] {
        &self.left_padding
    }

    /// Forgets everything written, keeping the allocation.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets the tokens after the first `len` (no effect if fewer are written), so the next
    /// forward pass continues from there: to re-run a step, or to reuse a shared prompt prefix.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Checks that `seq_len` more tokens fit.
    pub fn check_room(&self, seq_len: usize) -> Result<()> {
        if self.len + seq_len > self.capacity {
            return Err(Error::ContextOverflow { requested: self.len + seq_len, limit: self.capacity });
        }
        Ok(())
    }

    /// Rotary positions of the next `seq_len` tokens of each row: padding does not count, and
    /// padding tokens themselves sit at position 0.
    pub fn positions(&self, seq_len: usize) -> Vec<Vec<usize>> {
        self.left_padding
            .iter()
            .map(|&pad| (self.len..self.len + seq_len).map(|slot| slot.saturating_sub(pad)).collect())
            .collect()
    }

    /// The mask for the next `seq_len` queries against all keys up to and including them:
    /// causal, and padding keys hidden. A padding query still sees itself, so no row of the
    /// softmax is empty. `None` when nothing needs hiding (one new token, no padding).
    ///
    /// # Shapes
    /// - output: `[batch, 1, seq_len, len + seq_len]`
    pub fn mask(&self, seq_len: usize, device: &Device) -> Option<Tensor<4, Bool>> {
        let has_padding = self.left_padding.iter().any(|&pad| pad > 0);
        if seq_len == 1 && !has_padding {
            return None;
        }
        let total = self.len + seq_len;
        let mut hidden = Vec::with_capacity(self.batch_size() * seq_len * total);
        for &pad in &self.left_padding {
            for query in 0..seq_len {
                let slot = self.len + query;
                hidden.extend((0..total).map(|key| key > slot || (key < pad && key != slot)));
            }
        }
        let data = TensorData::new(hidden, [self.batch_size(), 1, seq_len, total]);
        Some(Tensor::from_data(data, device))
    }

    /// Writes one layer's keys and values for the new tokens and returns all keys and values so far.
    ///
    /// # Shapes
    /// - k, v: `[batch, kv_heads, seq_len, head_dim]`
    /// - output: two tensors `[batch, kv_heads, len + seq_len, head_dim]`
    pub(crate) fn update(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [batch, kv_heads, seq_len, head_dim] = k.dims();
        let (start, end) = (self.len, self.len + seq_len);
        let (k_cache, v_cache) = match self.layers[layer].take() {
            Some(cached) => cached,
            None => {
                let shape = [batch, self.kv_heads, self.capacity, self.head_dim];
                (zeros_like_dtype(shape, k.dtype(), &k.device()), zeros_like_dtype(shape, v.dtype(), &v.device()))
            }
        };
        let range = [0..batch, 0..kv_heads, start..end, 0..head_dim];
        let k_cache = k_cache.slice_assign(range.clone(), k);
        let v_cache = v_cache.slice_assign(range, v);
        let written = [0..batch, 0..kv_heads, 0..end, 0..head_dim];
        let out = (k_cache.clone().slice(written.clone()), v_cache.clone().slice(written));
        self.layers[layer] = Some((k_cache, v_cache));
        out
    }

    /// Records that `seq_len` tokens were written to every layer.
    pub(crate) fn advance(&mut self, seq_len: usize) {
        self.len += seq_len;
    }
}

fn zeros_like_dtype(shape: [usize; 4], dtype: DType, device: &Device) -> Tensor<4> {
    Tensor::zeros(shape, (device, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_rows(cache: &KvCache, seq_len: usize) -> Vec<bool> {
        cache.mask(seq_len, &crate::device::cpu()).unwrap().into_data().try_to_vec::<bool>().unwrap()
    }

    #[test]
    fn one_new_token_without_padding_needs_no_mask() {
        let mut cache = KvCache::new(1, 1, 1, 2, 8);
        cache.advance(3);
        assert!(cache.mask(1, &crate::device::cpu()).is_none());
        assert_eq!(cache.positions(1), vec![vec![3]]);
    }

    #[test]
    fn prefill_mask_is_causal() {
        let cache = KvCache::new(1, 1, 1, 2, 8);
        let t = true;
        let f = false;
        assert_eq!(mask_rows(&cache, 3), vec![f, t, t, f, f, t, f, f, f]);
    }

    #[test]
    fn left_padding_shifts_positions_and_hides_padding_keys() {
        let mut cache = KvCache::new(1, 2, 1, 2, 8).with_left_padding(vec![0, 2]).unwrap();
        assert_eq!(cache.positions(3), vec![vec![0, 1, 2], vec![0, 0, 0]]);
        let (t, f) = (true, false);
        // Row 1: keys 0 and 1 are padding; padding queries still see themselves.
        assert_eq!(mask_rows(&cache, 3)[9..], [f, t, t, t, f, t, t, t, f]);
        cache.advance(3);
        assert_eq!(cache.positions(1), vec![vec![3], vec![1]]);
        assert_eq!(mask_rows(&cache, 1), vec![f, f, f, f, t, t, f, f]);
    }

    #[test]
    fn overflow_is_reported() {
        let cache = KvCache::new(1, 1, 1, 2, 4);
        assert!(matches!(cache.check_room(5), Err(Error::ContextOverflow { requested: 5, limit: 4 })));
    }
}
