//! Scaled dot-product attention over burn's fused attention op, with grouped key/value heads.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor};

/// A boolean mask where `true` hides a key from a query, `[batch, 1, q_len, k_len]` (broadcast over
/// heads). `None` means every query sees every key.
pub type AttentionMask = Option<Tensor<4, Bool>>;

/// `softmax(q k^T * scale + mask) v`, with each group of `heads / kv_heads` query heads sharing one
/// key/value head (transformers' `repeat_kv` + `eager_attention_forward`).
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
    let [batch, heads, q_len, _] = q.dims();
    let [_, kv_heads, k_len, _] = k.dims();
    let k = repeat_kv(k, heads / kv_heads);
    let v = repeat_kv(v, heads / kv_heads);
    let mask = mask.map(|mask| mask.expand([batch, heads, q_len, k_len]));
    let options = AttentionModuleOptions { scale: Some(scale), softcap: None, is_causal: false };
    attention(q, k, v, mask, None, options)
}

/// Repeats each key/value head `n_rep` times, adjacent copies for one group.
///
/// # Shapes
/// - x: `[batch, kv_heads, len, head_dim]`
/// - output: `[batch, kv_heads * n_rep, len, head_dim]`
fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [batch, kv_heads, len, head_dim] = x.dims();
    x.unsqueeze_dim::<5>(2) // [batch, kv_heads, 1, len, head_dim]
        .expand([batch, kv_heads, n_rep, len, head_dim])
        .reshape([batch, kv_heads * n_rep, len, head_dim])
}
