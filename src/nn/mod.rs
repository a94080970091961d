//! Building blocks shared by the vision towers and the decoders: linear layers in PyTorch's weight
//! layout, normalisation layers, rotary embeddings, attention, gated MLPs and the KV cache.

pub mod attention;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rope;

pub use attention::{AttentionMask, scaled_dot_product_attention, segment_attention};
pub use kv_cache::KvCache;
pub use linear::{Linear, LinearConfig};
pub use mlp::{Activation, GatedMlp, GatedMlpConfig};
pub use norm::{LayerNorm, LayerNormConfig, Norm, NormConfig, NormKind, RmsNorm, RmsNormConfig};
pub use rope::{RopeScaling, RopeTables, RotaryEmbedding};
