//! A preallocated key/value cache for a batch of sequences, and the positions and attention mask
//! that follow from it.
//!
//! All rows of a batch share one write position; shorter prompts are left-padded. The cache knows
//! each row's padding, so it derives each token's rotary position (padding does not count) and hides
//! padding keys from every query. Models whose prompt positions run ahead of the token count
//! (Qwen-VL's multimodal RoPE: an image is one step per row, not one per token) record each row's
//! offset, so decoding continues at the right position.

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use super::mamba::MambaState;
use crate::error::{Error, Result};

/// On a GPU, KV cache capacities are multiples of this many tokens ([`KvCache::for_device`]):
/// attention reads the whole capacity, and each distinct capacity is a new set of kernel shapes.
pub const GPU_CAPACITY_STEP: usize = 256;

/// Keys and values of every decoder layer, written in place as tokens arrive.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// The state of each recurrent (Mamba) layer, which summarises every token so far.
    recurrent: Vec<Option<MambaState>>,
    left_padding: Vec<usize>,
    /// Added to each row's token count to give its position (the "rope delta").
    position_offsets: Vec<i64>,
    /// Mistral's sliding window: a query sees at most this many keys, itself included.
    sliding_window: Option<usize>,
    capacity: usize,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Attention reads every slot of the capacity (unwritten ones masked) instead of the written
    /// ones: one key length for a whole generation.
    fixed_shapes: bool,
    /// What a decode step's mask is derived from on the device, kept for the whole generation.
    decode_mask: Option<DecodeMaskParts>,
}

/// The parts of a one-token mask that stay the same for a whole generation, on the device: the
/// mask of a decode step is derived from them and the step's slot number, so the host neither
/// builds nor uploads `batch x keys` booleans per token.
#[derive(Debug)]
struct DecodeMaskParts {
    device: Device,
    /// The padding of each row the parts were built for.
    left_padding: Vec<usize>,
    /// Each key slot's index, `[capacity]`.
    slots: Tensor<1, Int>,
    /// Which key slots are padding of their row, `[batch, 1, 1, capacity]`; `None` without padding.
    padding: Option<Tensor<4, Bool>>,
}

impl KvCache {
    /// An empty cache for `batch` sequences of up to `capacity` tokens each (prompt and generated
    /// tokens together). Memory is allocated on the first forward pass, in the activations' dtype.
    pub fn new(num_layers: usize, batch: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            recurrent: (0..num_layers).map(|_| None).collect(),
            left_padding: vec![0; batch],
            position_offsets: vec![0; batch],
            sliding_window: None,
            capacity,
            len: 0,
            kv_heads,
            head_dim,
            fixed_shapes: false,
            decode_mask: None,
        }
    }

    /// Makes attention read all `capacity` slots, the unwritten ones masked, so that every decode
    /// step has the same shapes. On the CubeCL backends each new shape costs a kernel compilation
    /// and an autotune run; with this, a generation compiles its decode step once. The CPU needs
    /// no such thing and reads only the written slots.
    pub fn with_fixed_shapes(mut self, fixed: bool) -> Self {
        self.fixed_shapes = fixed;
        self
    }

    /// Shapes the cache for `device`, before the first forward pass. On the GPU backends attention
    /// reads the whole capacity ([`with_fixed_shapes`](Self::with_fixed_shapes)) and the capacity
    /// is rounded up to a multiple of [`GPU_CAPACITY_STEP`], so that the decode steps of a
    /// generation, and of requests of similar lengths, share their kernels. The CPU reads the
    /// written slots only.
    pub fn for_device(mut self, device: &Device) -> Self {
        if crate::device::is_cpu(device) {
            return self;
        }
        self.capacity = self.capacity.div_ceil(GPU_CAPACITY_STEP).max(1) * GPU_CAPACITY_STEP;
        self.with_fixed_shapes(true)
    }

    /// How many key slots attention reads once `written` slots are written.
    fn attended(&self, written: usize) -> usize {
        if self.fixed_shapes { self.capacity.max(written) } else { written }
    }

    /// Lets each query see only the `window` most recent keys, itself included (Mistral's
    /// `sliding_window`).
    pub fn with_sliding_window(mut self, window: Option<usize>) -> Self {
        self.sliding_window = window.filter(|&window| window > 0);
        self
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

    /// Forgets everything written, padding included, keeping the allocation: the cache is as new,
    /// ready for a batch declared again with [`with_left_padding`](Self::with_left_padding) or
    /// [`set_left_padding`](Self::set_left_padding).
    pub fn clear(&mut self) {
        self.len = 0;
        self.recurrent.iter_mut().for_each(|state| *state = None);
        self.left_padding.fill(0);
        self.position_offsets.fill(0);
    }

    /// Sets how far each row's positions run ahead of its token count (`max position + 1 -
    /// tokens` after a Qwen-VL prompt), so later tokens continue from the prompt's last position.
    pub fn set_position_offsets(&mut self, offsets: Vec<i64>) -> Result<()> {
        if offsets.len() != self.batch_size() {
            return Err(Error::Input(format!(
                "{} position offsets for a batch of {}",
                offsets.len(),
                self.batch_size()
            )));
        }
        self.position_offsets = offsets;
        Ok(())
    }

    /// Declares each row's padding on an empty cache (as [`with_left_padding`](Self::with_left_padding)).
    pub fn set_left_padding(&mut self, left_padding: Vec<usize>) -> Result<()> {
        if self.len > 0 {
            return Err(Error::Input("padding can only be declared on an empty KV cache (clear it first)".into()));
        }
        if left_padding.len() != self.left_padding.len() {
            return Err(Error::Input(format!(
                "{} padding lengths for a batch of {}",
                left_padding.len(),
                self.left_padding.len()
            )));
        }
        self.left_padding = left_padding;
        Ok(())
    }

    /// Keeps only the given rows (indices into the current batch, in the order given) and drops
    /// the others, so sequences that have finished stop costing compute.
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        let batch = self.batch_size();
        if rows.is_empty() || rows.iter().any(|&row| row >= batch) {
            return Err(Error::Input(format!("cannot keep rows {rows:?} of a batch of {batch}")));
        }
        if rows.iter().copied().eq(0..batch) {
            return Ok(());
        }
        self.left_padding = rows.iter().map(|&row| self.left_padding[row]).collect();
        self.position_offsets = rows.iter().map(|&row| self.position_offsets[row]).collect();
        let indices = |device: &Device| {
            let indices: Vec<i64> = rows.iter().map(|&row| row as i64).collect();
            Tensor::<1, Int>::from_data(TensorData::new(indices, [rows.len()]), device)
        };
        for layer in self.layers.iter_mut().flatten() {
            let indices = indices(&layer.0.device());
            layer.0 = layer.0.clone().select(0, indices.clone());
            layer.1 = layer.1.clone().select(0, indices);
        }
        for state in self.recurrent.iter_mut().flatten() {
            let indices = indices(&state.conv.device());
            state.conv = state.conv.clone().select(0, indices.clone());
            state.ssm = state.ssm.clone().select(0, indices);
        }
        Ok(())
    }

    /// Forgets the tokens after the first `len` (no effect if fewer are written), so the next
    /// forward pass continues from there: to re-run a step, or to reuse a shared prompt prefix.
    /// A recurrent layer's state cannot be rewound: with one, only `len` >= the tokens written
    /// (or 0, which clears the cache) is accepted.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len < self.len && self.recurrent.iter().any(Option::is_some) {
            if len == 0 {
                let padding = std::mem::take(&mut self.left_padding);
                self.clear();
                self.left_padding = padding;
                return Ok(());
            }
            return Err(Error::Input(format!(
                "cannot rewind to {len} of {} tokens: recurrent layers keep no per-token history",
                self.len
            )));
        }
        self.len = self.len.min(len);
        Ok(())
    }

    /// The state of recurrent layer `layer` after the tokens so far (none before them, and none
    /// for other layers).
    pub fn recurrent_state(&self, layer: usize) -> Option<&MambaState> {
        self.recurrent.get(layer).and_then(Option::as_ref)
    }

    /// Takes the state of recurrent layer `layer` (none before its first tokens).
    pub(crate) fn take_recurrent(&mut self, layer: usize) -> Option<MambaState> {
        self.recurrent.get_mut(layer).and_then(Option::take)
    }

    /// Keeps the state of recurrent layer `layer` after the current tokens.
    pub(crate) fn put_recurrent(&mut self, layer: usize, state: MambaState) {
        if let Some(slot) = self.recurrent.get_mut(layer) {
            *slot = Some(state);
        }
    }

    /// Which of the next `seq_len` tokens of each row are not padding, `[batch, seq_len, 1]`;
    /// `None` when none is.
    pub fn real_tokens(&self, seq_len: usize, device: &Device) -> Option<Tensor<3, Bool>> {
        if self.left_padding.iter().all(|&pad| pad <= self.len) {
            return None;
        }
        let real: Vec<bool> =
            self.left_padding.iter().flat_map(|&pad| (0..seq_len).map(move |t| self.len + t >= pad)).collect();
        Some(Tensor::from_data(TensorData::new(real, [self.batch_size(), seq_len, 1]), device))
    }

    /// Checks that `seq_len` more tokens fit.
    pub fn check_room(&self, seq_len: usize) -> Result<()> {
        if self.len + seq_len > self.capacity {
            return Err(Error::ContextOverflow { requested: self.len + seq_len, limit: self.capacity });
        }
        Ok(())
    }

    /// Rotary positions of the next `seq_len` tokens of each row: padding does not count (padding
    /// tokens themselves sit at position 0), and each row's position offset is added.
    pub fn positions(&self, seq_len: usize) -> Vec<Vec<usize>> {
        self.left_padding
            .iter()
            .zip(&self.position_offsets)
            .map(|(&pad, &offset)| {
                (self.len..self.len + seq_len)
                    .map(|slot| if slot < pad { 0 } else { ((slot - pad) as i64 + offset).max(0) as usize })
                    .collect()
            })
            .collect()
    }

    /// The mask for the next `seq_len` queries against the keys attention reads: causal (which
    /// also hides unwritten slots), padding keys hidden, and with a sliding window, keys `window`
    /// or more tokens back hidden. A padding query still sees itself, so no row of the softmax is
    /// empty. `None` when nothing needs hiding (one new token, no padding, inside the window, no
    /// unwritten slot read). A decode step's mask (one token per row, every row past its padding)
    /// is derived on the device from parts kept for the generation; a prompt's is built here.
    ///
    /// # Shapes
    /// - output: `[batch, 1, seq_len, keys]`, `keys` = `len + seq_len`, or the capacity with
    ///   [fixed shapes](Self::with_fixed_shapes)
    pub fn mask(&mut self, seq_len: usize, device: &Device) -> Option<Tensor<4, Bool>> {
        let has_padding = self.left_padding.iter().any(|&pad| pad > 0);
        let total = self.len + seq_len;
        let keys = self.attended(total);
        let window = self.sliding_window.unwrap_or(usize::MAX);
        if seq_len == 1 && !has_padding && total <= window && keys == total {
            return None;
        }
        if seq_len == 1 && keys <= self.capacity && self.left_padding.iter().all(|&pad| pad <= self.len) {
            return Some(self.decode_step_mask(keys, window, device));
        }
        let mut hidden = Vec::with_capacity(self.batch_size() * seq_len * keys);
        for &pad in &self.left_padding {
            for query in 0..seq_len {
                let slot = self.len + query;
                hidden.extend(
                    (0..keys).map(|key| key > slot || (key < pad && key != slot) || slot - key.min(slot) >= window),
                );
            }
        }
        let data = TensorData::new(hidden, [self.batch_size(), 1, seq_len, keys]);
        Some(Tensor::from_data(data, device))
    }

    /// The mask of one new token in slot `len` of every row (each past its padding) against the
    /// first `keys` slots: keys after the slot, padding keys and keys out of the window hidden.
    fn decode_step_mask(&mut self, keys: usize, window: usize, device: &Device) -> Tensor<4, Bool> {
        let batch = self.batch_size();
        let capacity = self.capacity;
        let stale = |parts: &DecodeMaskParts| parts.device != *device || parts.left_padding != self.left_padding;
        if self.decode_mask.as_ref().is_none_or(stale) {
            let padding = self.left_padding.iter().any(|&pad| pad > 0).then(|| {
                let padding: Vec<bool> =
                    self.left_padding.iter().flat_map(|&pad| (0..capacity).map(move |key| key < pad)).collect();
                Tensor::from_data(TensorData::new(padding, [batch, 1, 1, capacity]), device)
            });
            self.decode_mask = Some(DecodeMaskParts {
                device: device.clone(),
                left_padding: self.left_padding.clone(),
                slots: Tensor::arange(0..capacity as i64, device),
                padding,
            });
        }
        let parts = self.decode_mask.as_ref().expect("set above");
        let slot = self.len as i64;
        let slots = parts.slots.clone().slice(0..keys);
        let mut hidden = slots.clone().greater_elem(slot);
        if self.len >= window {
            hidden = hidden.bool_or(slots.lower_equal_elem(slot - window as i64));
        }
        let hidden = hidden.reshape([1, 1, 1, keys]).expand([batch, 1, 1, keys]);
        match &parts.padding {
            Some(padding) => padding.clone().slice([0..batch, 0..1, 0..1, 0..keys]).bool_or(hidden),
            None => hidden,
        }
    }

    /// Writes one layer's keys and values for the new tokens and returns the keys and values
    /// attention reads: those so far (or every slot, with [fixed shapes](Self::with_fixed_shapes)).
    /// Fails, writing nothing, when they do not fit or do not match the cache's shape.
    ///
    /// # Shapes
    /// - k, v: `[batch, kv_heads, seq_len, head_dim]`
    /// - output: two tensors `[batch, kv_heads, keys, head_dim]`, as [`mask`](Self::mask)
    pub(crate) fn update(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> Result<(Tensor<4>, Tensor<4>)> {
        let [batch, kv_heads, seq_len, head_dim] = k.dims();
        self.check_room(seq_len)?;
        let expected = [self.batch_size(), self.kv_heads, seq_len, self.head_dim];
        if k.dims() != expected || v.dims() != expected || layer >= self.layers.len() {
            return Err(Error::Input(format!(
                "keys {:?} and values {:?} for layer {layer} do not fit a KV cache of {} layers, shaped {expected:?}",
                k.dims(),
                v.dims(),
                self.layers.len()
            )));
        }
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
        let written = [0..batch, 0..kv_heads, 0..self.attended(end), 0..head_dim];
        let out = (k_cache.clone().slice(written.clone()), v_cache.clone().slice(written));
        self.layers[layer] = Some((k_cache, v_cache));
        Ok(out)
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

    fn mask_rows(cache: &mut KvCache, seq_len: usize) -> Vec<bool> {
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
        let mut cache = KvCache::new(1, 1, 1, 2, 8);
        let t = true;
        let f = false;
        assert_eq!(mask_rows(&mut cache, 3), vec![f, t, t, f, f, t, f, f, f]);
    }

    #[test]
    fn left_padding_shifts_positions_and_hides_padding_keys() {
        let mut cache = KvCache::new(1, 2, 1, 2, 8).with_left_padding(vec![0, 2]).unwrap();
        assert_eq!(cache.positions(3), vec![vec![0, 1, 2], vec![0, 0, 0]]);
        let (t, f) = (true, false);
        // Row 1: keys 0 and 1 are padding; padding queries still see themselves.
        assert_eq!(mask_rows(&mut cache, 3)[9..], [f, t, t, t, f, t, t, t, f]);
        cache.advance(3);
        assert_eq!(cache.positions(1), vec![vec![3], vec![1]]);
        assert_eq!(mask_rows(&mut cache, 1), vec![f, f, f, f, t, t, f, f]);
    }

    fn keys(batch: usize, seq_len: usize, value: f32) -> Tensor<4> {
        Tensor::full([batch, 1, seq_len, 2], value, &crate::device::cpu())
    }

    #[test]
    fn update_refuses_tokens_that_do_not_fit_without_writing() {
        let mut cache = KvCache::new(1, 1, 1, 2, 4);
        cache.update(0, keys(1, 3, 1.0), keys(1, 3, 1.0)).unwrap();
        cache.advance(3);
        let error = cache.update(0, keys(1, 2, 2.0), keys(1, 2, 2.0)).unwrap_err();
        assert!(matches!(error, Error::ContextOverflow { requested: 5, limit: 4 }), "{error}");
        assert!(matches!(cache.update(1, keys(1, 1, 2.0), keys(1, 1, 2.0)), Err(Error::Input(_))));
        assert!(matches!(cache.update(0, keys(2, 1, 2.0), keys(2, 1, 2.0)), Err(Error::Input(_))));
        let (k, _) = cache.update(0, keys(1, 1, 2.0), keys(1, 1, 2.0)).unwrap();
        assert_eq!(k.into_data().try_to_vec::<f32>().unwrap(), vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]);
    }

    #[test]
    fn clear_forgets_the_padding_too() {
        let mut cache = KvCache::new(1, 2, 1, 2, 8).with_left_padding(vec![0, 2]).unwrap();
        cache.advance(3);
        cache.clear();
        assert_eq!((cache.len(), cache.left_padding()), (0, &[0, 0][..]));
        assert_eq!(cache.positions(2), vec![vec![0, 1], vec![0, 1]]);
        assert!(matches!(cache.set_left_padding(vec![1]), Err(Error::Input(_))));
        cache.set_left_padding(vec![1, 0]).unwrap();
        assert_eq!(cache.positions(2), vec![vec![0, 0], vec![0, 1]]);
    }

    #[test]
    fn retain_rows_keeps_the_chosen_rows_and_their_padding() {
        let mut cache = KvCache::new(1, 3, 1, 2, 4).with_left_padding(vec![0, 1, 2]).unwrap();
        let device = crate::device::cpu();
        let rows: Vec<f32> = (0..3).flat_map(|row| [row as f32; 2]).collect();
        let k = Tensor::<1>::from_floats(rows.as_slice(), &device).reshape([3, 1, 1, 2]);
        cache.update(0, k.clone(), k).unwrap();
        cache.advance(1);
        cache.retain_rows(&[2, 0]).unwrap();
        assert_eq!(cache.left_padding(), &[2, 0]);
        let (k, _) = cache.update(0, keys(2, 1, 9.0), keys(2, 1, 9.0)).unwrap();
        assert_eq!(k.into_data().try_to_vec::<f32>().unwrap(), vec![2.0, 2.0, 9.0, 9.0, 0.0, 0.0, 9.0, 9.0]);
        assert!(cache.retain_rows(&[2]).is_err());
        assert!(cache.retain_rows(&[]).is_err());
    }

    #[test]
    fn a_sliding_window_hides_keys_that_far_back() {
        let mut cache = KvCache::new(1, 1, 1, 2, 8).with_sliding_window(Some(2));
        let (t, f) = (true, false);
        assert_eq!(mask_rows(&mut cache, 3), vec![f, t, t, f, f, t, t, f, f]);
        cache.advance(3);
        // One new token still needs a mask once keys fall out of the window.
        assert_eq!(mask_rows(&mut cache, 1), vec![t, t, f, f]);
    }

    #[test]
    fn fixed_shapes_read_every_slot_and_mask_the_unwritten_ones() {
        let device = crate::device::cpu();
        let mut cache = KvCache::new(1, 1, 1, 2, 6).with_fixed_shapes(true);
        assert_eq!(
            mask_rows(&mut cache, 2),
            [false, true, true, true, true, true, false, false, true, true, true, true]
        );
        let (k, _) = cache.update(0, keys(1, 2, 1.0), keys(1, 2, 1.0)).unwrap();
        assert_eq!(k.dims(), [1, 1, 6, 2]);
        cache.advance(2);
        // One new token still gets a mask: slots 3.. are not written yet.
        let mask = cache.mask(1, &device).expect("unwritten slots to hide");
        assert_eq!(mask.dims(), [1, 1, 1, 6]);
        assert_eq!(mask_rows(&mut cache, 1), [false, false, false, true, true, true]);
    }

    #[test]
    fn decode_masks_follow_a_new_padding_after_clear_and_retain() {
        let (t, f) = (true, false);
        let mut cache = KvCache::new(1, 2, 1, 2, 5).with_fixed_shapes(true).with_left_padding(vec![0, 2]).unwrap();
        cache.advance(3);
        assert_eq!(mask_rows(&mut cache, 1), [f, f, f, f, t, t, t, f, f, t]);
        cache.retain_rows(&[1]).unwrap();
        assert_eq!(mask_rows(&mut cache, 1), [t, t, f, f, t]);
        cache.clear();
        cache.set_left_padding(vec![1]).unwrap();
        cache.advance(2);
        assert_eq!(mask_rows(&mut cache, 1), [t, f, f, t, t]);
    }

    #[test]
    fn overflow_is_reported() {
        let cache = KvCache::new(1, 1, 1, 2, 4);
        assert!(matches!(cache.check_room(5), Err(Error::ContextOverflow { requested: 5, limit: 4 })));
    }
}
