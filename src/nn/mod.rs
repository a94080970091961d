//! Building blocks shared by the vision towers and the decoders: linear layers in PyTorch's weight
//! layout, normalisation layers, rotary embeddings, attention, gated MLPs and the KV cache.

pub mod attention;
pub mod gemv;
pub mod kv_cache;
pub mod linear;
pub mod mamba;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod rope;

pub use attention::{AttentionMask, scaled_dot_product_attention, segment_attention};
pub use kv_cache::KvCache;
pub use linear::{Linear, LinearConfig};
pub use mlp::{Activation, GatedMlp, GatedMlpConfig};
pub use norm::{LayerNorm, LayerNormConfig, Norm, NormConfig, NormKind, RmsNorm, RmsNormConfig};
pub use rope::{RopeScaling, RopeTables, RotaryEmbedding};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Int, Tensor};

/// A tensor of f32 values kept in f32 whatever the device's float dtype: tables and weights the
/// reference computes in f32 (rotary cosines, interpolation weights).
pub(crate) fn f32_tensor<const D: usize>(data: burn::tensor::TensorData, device: &burn::tensor::Device) -> Tensor<D> {
    let options = burn::tensor::TensorCreationOptions::new(device.clone()).with_dtype(burn::tensor::DType::F32);
    Tensor::from_data(data, options)
}

/// Bytes a module's parameters occupy as stored (quantized weights at their packed size).
pub fn parameter_bytes(module: &impl Module) -> usize {
    struct Bytes(usize);
    impl ModuleVisitor for Bytes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            self.0 += value.shape().num_elements() * value.dtype().size();
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
            let value = param.val();
            self.0 += value.shape().num_elements() * value.dtype().size();
        }
    }
    let mut bytes = Bytes(0);
    module.visit(&mut bytes);
    bytes.0
}
