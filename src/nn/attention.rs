//! Scaled dot-product attention over burn's fused attention op, with grouped key/value heads.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor, TensorData};

/// Attention of one new token per sequence, on the CPU.
mod cpu {
    use burn::tensor::{Bool, Tensor, TensorData};
    use burn_flex::FlexTensor;
    use rayon::prelude::*;

    use crate::nn::gemv;

    /// Attention for `q: [batch, kv_heads, rows, head_dim]` (the query heads of a group folded into
    /// rows, one position each) over keys and values read where they lie: views of the KV cache,
    /// whose heads are not adjacent. burn-flex's attention first copies such views whole, and
    /// that copy and its small matrix products were most of a decode step's attention at the 1B
    /// shape. `None` unless every tensor is f32 on burn-flex with contiguous head rows.
    pub(super) fn decode_attention(
        q: &Tensor<4>,
        k: &Tensor<4>,
        v: &Tensor<4>,
        mask: Option<&Tensor<4, Bool>>,
        scale: f64,
    ) -> Option<Tensor<4>> {
        let [batch, kv_heads, rows, head_dim] = q.dims();
        let k_len = k.dims()[2];
        let device = q.device();
        let (q, k, v) = (gemv::f32_on_cpu(q)?, gemv::f32_primitive(k)?, gemv::f32_primitive(v)?);
        let queries = gemv::contiguous(&q)?;
        let (keys, values) = (Rows::of(&k)?, Rows::of(&v)?);
        // `[batch, 1, 1, k_len]`: which keys each sequence's new token must not see.
        let hidden: Option<Vec<bool>> = match mask {
            Some(mask) => Some(mask.clone().expand([batch, 1, 1, k_len]).into_data().try_to_vec::<bool>().ok()?),
            None => None,
        };
        let mut out = vec![0f32; batch * kv_heads * rows * head_dim];
        out.par_chunks_mut(rows * head_dim).enumerate().for_each(|(task, out)| {
            let (b, head) = (task / kv_heads, task % kv_heads);
            let hidden = hidden.as_ref().map(|hidden| &hidden[b * k_len..(b + 1) * k_len]);
            let mut scores = vec![0f32; k_len];
            for (row, out) in out.chunks_exact_mut(head_dim).enumerate() {
                let query = &queries[(task * rows + row) * head_dim..][..head_dim];
                for (j, score) in scores.iter_mut().enumerate() {
                    *score = match hidden {
                        Some(hidden) if hidden[j] => f32::NEG_INFINITY,
                        _ => gemv::dot(query, keys.row(b, head, j)) * scale as f32,
                    };
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if max == f32::NEG_INFINITY {
                    continue; // every key hidden: zeros
                }
                let mut total = 0f32;
                for score in scores.iter_mut() {
                    *score = (*score - max).exp();
                    total += *score;
                }
                for (j, &weight) in scores.iter().enumerate() {
                    let weight = weight / total;
                    for (o, &value) in out.iter_mut().zip(values.row(b, head, j)) {
                        *o += weight * value;
                    }
                }
            }
        });
        let data = TensorData::new(out, [batch, kv_heads, rows, head_dim]);
        Some(Tensor::from_data(data, &device))
    }

    /// Rows of `head_dim` values of a `[batch, heads, len, head_dim]` view with contiguous rows.
    struct Rows<'a> {
        storage: &'a [f32],
        start: usize,
        strides: [usize; 3],
        head_dim: usize,
    }

    impl<'a> Rows<'a> {
        fn of(tensor: &'a FlexTensor) -> Option<Self> {
            let layout = tensor.layout();
            let (strides, dims) = (layout.strides(), layout.shape());
            if strides.len() != 4 || strides[3] != 1 || strides.iter().any(|&stride| stride < 0) {
                return None;
            }
            let storage = tensor.storage::<f32>();
            let stride = |axis: usize| strides[axis] as usize;
            let last =
                layout.start_offset() + (0..4).map(|axis| dims[axis].saturating_sub(1) * stride(axis)).sum::<usize>();
            (layout.num_elements() > 0 && last < storage.len()).then_some(Self {
                storage,
                start: layout.start_offset(),
                strides: [stride(0), stride(1), stride(2)],
                head_dim: dims[3],
            })
        }

        fn row(&self, batch: usize, head: usize, position: usize) -> &'a [f32] {
            let at = self.start + batch * self.strides[0] + head * self.strides[1] + position * self.strides[2];
            &self.storage[at..at + self.head_dim]
        }
    }
}

/// A boolean mask where `true` hides a key from a query, `[batch, 1, q_len, k_len]` (broadcast over
/// heads). `None` means every query sees every key.
pub type AttentionMask = Option<Tensor<4, Bool>>;

/// `softmax(q k^T * scale + mask) v`, with each group of `heads / kv_heads` query heads sharing one
/// key/value head (transformers' `repeat_kv` + `eager_attention_forward`).
///
/// The query heads of a group are folded into the query axis (`[batch, kv_heads, group * q_len,
/// head_dim]`) instead of repeating the keys and values `group` times: a decode step then reads
/// the cache once per layer instead of copying it.
///
/// # Shapes
/// - q: `[batch, heads, q_len, head_dim]`
/// - k, v: `[batch, kv_heads, k_len, head_dim]`
/// - mask: `[batch, 1, q_len, k_len]`
/// - output: `[batch, heads, q_len, head_dim]`
pub fn scaled_dot_product_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: AttentionMask,
    scale: f64,
) -> Tensor<4> {
    let [batch, heads, q_len, head_dim] = q.dims();
    let [_, kv_heads, k_len, _] = k.dims();
    let group = heads / kv_heads;
    // Head `kv * group + g` sits at rows `g * q_len..(g + 1) * q_len` of key/value head `kv`.
    let q = q.reshape([batch, kv_heads, group * q_len, head_dim]);
    if q_len == 1
        && let Some(out) = cpu::decode_attention(&q, &k, &v, mask.as_ref(), scale)
    {
        return out.reshape([batch, heads, q_len, head_dim]);
    }
    let mask = mask.map(|mask| {
        let mask = if group > 1 && q_len > 1 {
            // [batch, 1, q_len, k_len] -> [batch, 1, group * q_len, k_len]: one copy per group
            mask.unsqueeze_dim::<5>(1).expand([batch, group, 1, q_len, k_len]).reshape([batch, 1, group * q_len, k_len])
        } else {
            mask
        };
        mask.expand([batch, kv_heads, group * q_len, k_len])
    });
    let options = AttentionModuleOptions { scale: Some(scale), softcap: None, is_causal: false };
    attention(q, k, v, mask, None, options).reshape([batch, heads, q_len, head_dim])
}

/// Attention of each segment of consecutive rows to itself alone (block-diagonal, as
/// transformers' `cu_seqlens` splits vision attention into frames and windows). Segments of one
/// length run as one batch; others are padded to the longest with hidden padding keys.
///
/// # Shapes
/// - q, k, v: `[rows, heads, head_dim]`, `rows` the sum of `segments`
/// - output: `[rows, heads, head_dim]`
pub fn segment_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, segments: &[usize], scale: f64) -> Tensor<3> {
    let [rows, heads, head_dim] = q.dims();
    let longest = segments.iter().copied().max().unwrap_or(0);
    let count = segments.len();
    let options = AttentionModuleOptions { scale: Some(scale), softcap: None, is_causal: false };
    if segments.iter().all(|&len| len == longest) {
        // [rows, heads, head_dim] -> [segments, heads, len, head_dim]
        let batch = |t: Tensor<3>| t.reshape([count, longest, heads, head_dim]).swap_dims(1, 2);
        let out = attention(batch(q), batch(k), batch(v), None, None, options);
        return out.swap_dims(1, 2).reshape([rows, heads, head_dim]);
    }
    let device = q.device();
    // Slot (segment, i) reads row start + i, or the zero row appended at `rows` when padding.
    let mut gather = Vec::with_capacity(count * longest);
    let mut valid = Vec::with_capacity(rows);
    let mut hidden = Vec::with_capacity(count * longest * longest);
    let mut start = 0;
    for (segment, &len) in segments.iter().enumerate() {
        for i in 0..longest {
            gather.push(if i < len { (start + i) as i64 } else { rows as i64 });
        }
        valid.extend((0..len).map(|i| (segment * longest + i) as i64));
        for _query in 0..longest {
            hidden.extend((0..longest).map(|key| key >= len));
        }
        start += len;
    }
    let gather = Tensor::<1, Int>::from_data(TensorData::new(gather, [count * longest]), &device);
    let valid = Tensor::<1, Int>::from_data(TensorData::new(valid, [rows]), &device);
    let mask = Tensor::<4, Bool>::from_data(TensorData::new(hidden, [count, 1, longest, longest]), &device)
        .expand([count, heads, longest, longest]);
    let padded = |t: Tensor<3>| {
        let zero = Tensor::zeros([1, heads, head_dim], (&device, t.dtype()));
        // [rows + 1, heads, head_dim] -> [segments, heads, longest, head_dim]
        Tensor::cat(vec![t, zero], 0)
            .select(0, gather.clone())
            .reshape([count, longest, heads, head_dim])
            .swap_dims(1, 2)
    };
    let out = attention(padded(q), padded(k), padded(v), Some(mask), None, options);
    // [segments, heads, longest, head_dim] -> [rows, heads, head_dim]
    out.swap_dims(1, 2).reshape([count * longest, heads, head_dim]).select(0, valid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' way: every key/value head repeated for its group of query heads.
    fn attention_with_repeated_kv(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: AttentionMask) -> Tensor<4> {
        let [batch, heads, q_len, head_dim] = q.dims();
        let [_, kv_heads, k_len, _] = k.dims();
        let repeat = |x: Tensor<4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([batch, kv_heads, heads / kv_heads, k_len, head_dim])
                .reshape([batch, heads, k_len, head_dim])
        };
        let mask = mask.map(|mask| mask.expand([batch, heads, q_len, k_len]));
        let options = AttentionModuleOptions { scale: Some(0.3), softcap: None, is_causal: false };
        attention(q, repeat(k), repeat(v), mask, None, options)
    }

    #[test]
    fn grouped_query_heads_fold_into_the_query_axis() {
        let device = crate::device::cpu();
        let (batch, heads, kv_heads, k_len, head_dim) = (2, 6, 2, 5, 4);
        let tensor = |dims: [usize; 4], seed: usize| {
            let values: Vec<f32> =
                (0..dims.iter().product()).map(|i| (((i + seed) * 37 % 23) as f32 - 11.0) / 7.0).collect();
            Tensor::<1>::from_floats(values.as_slice(), &device).reshape(dims)
        };
        for q_len in [1, 3] {
            let q = tensor([batch, heads, q_len, head_dim], 1);
            let k = tensor([batch, kv_heads, k_len, head_dim], 2);
            let v = tensor([batch, kv_heads, k_len, head_dim], 3);
            // Row 1 hides its first two keys; each query hides the keys after its own slot.
            let hidden: Vec<bool> = (0..batch)
                .flat_map(|row| {
                    (0..q_len).flat_map(move |t| (0..k_len).map(move |key| (row == 1 && key < 2) || key > 2 + t))
                })
                .collect();
            let mask = Tensor::<4, Bool>::from_data(TensorData::new(hidden, [batch, 1, q_len, k_len]), &device);
            let got = scaled_dot_product_attention(q.clone(), k.clone(), v.clone(), Some(mask.clone()), 0.3);
            let want = attention_with_repeated_kv(q, k, v, Some(mask));
            let (got, want) =
                (got.into_data().try_to_vec::<f32>().unwrap(), want.into_data().try_to_vec::<f32>().unwrap());
            assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "q_len {q_len}: {got:?} vs {want:?}");
        }
    }

    #[test]
    fn decode_attention_reads_cache_views_as_the_fused_op_does() {
        let device = crate::device::cpu();
        let (batch, heads, kv_heads, capacity, k_len, head_dim) = (2, 6, 2, 9, 5, 16);
        let tensor = |dims: [usize; 4], seed: usize| {
            let values: Vec<f32> =
                (0..dims.iter().product()).map(|i| (((i + seed) * 37 % 23) as f32 - 11.0) / 7.0).collect();
            Tensor::<1>::from_floats(values.as_slice(), &device).reshape(dims)
        };
        let q = tensor([batch, heads, 1, head_dim], 1);
        // The first `k_len` slots of a cache of `capacity`: heads not adjacent in memory.
        let k = tensor([batch, kv_heads, capacity, head_dim], 2).narrow(2, 0, k_len);
        let v = tensor([batch, kv_heads, capacity, head_dim], 3).narrow(2, 0, k_len);
        // Row 1 hides its first two keys (left padding).
        let hidden: Vec<bool> = (0..batch).flat_map(|row| (0..k_len).map(move |key| row == 1 && key < 2)).collect();
        let mask = Tensor::<4, Bool>::from_data(TensorData::new(hidden, [batch, 1, 1, k_len]), &device);
        for mask in [None, Some(mask)] {
            let folded = q.clone().reshape([batch, kv_heads, heads / kv_heads, head_dim]);
            assert!(cpu::decode_attention(&folded, &k, &v, mask.as_ref(), 0.3).is_some(), "the CPU path applies");
            let got = scaled_dot_product_attention(q.clone(), k.clone(), v.clone(), mask.clone(), 0.3);
            let want = attention_with_repeated_kv(q.clone(), k.clone(), v.clone(), mask.clone());
            let (got, want) =
                (got.into_data().try_to_vec::<f32>().unwrap(), want.into_data().try_to_vec::<f32>().unwrap());
            let masked = mask.is_some();
            assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "mask {masked}: {got:?} vs {want:?}");
        }
    }

    #[test]
    fn segments_attend_only_within_themselves() {
        let device = crate::device::cpu();
        let rows = 7;
        let values: Vec<f32> = (0..rows * 2 * 4).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
        let x = Tensor::<1>::from_floats(values.as_slice(), &device).reshape([rows, 2, 4]);
        let segments = [3, 4];
        let together = segment_attention(x.clone(), x.clone(), x.clone(), &segments, 0.5);
        // Each segment alone, as a batch of one.
        let mut start = 0;
        for &len in &segments {
            let part = x.clone().narrow(0, start, len);
            let alone = segment_attention(part.clone(), part.clone(), part, &[len], 0.5);
            let got = together.clone().narrow(0, start, len).into_data().try_to_vec::<f32>().unwrap();
            let want = alone.into_data().try_to_vec::<f32>().unwrap();
            assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?} vs {want:?}");
            start += len;
        }
    }
}
