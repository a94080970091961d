//! LayerNorm and RMSNorm with the parameter names of PyTorch checkpoints (`weight`, `bias`).
//! Statistics are computed in f32 whatever the activation dtype.

use burn::module::{Initializer, Module, Param};
use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// Which normalisation a block uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// `nn.LayerNorm`: subtract the mean, divide by the standard deviation, scale and shift.
    LayerNorm,
    /// RMSNorm: divide by the root mean square and scale (no mean, no bias).
    RmsNorm,
}

/// Configuration of a [`LayerNorm`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerNormConfig {
    /// Normalised features (the last dimension).
    pub d_model: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Whether the layer has a learned shift.
    pub bias: bool,
}

impl LayerNormConfig {
    /// Creates the layer (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> LayerNorm {
        LayerNorm {
            weight: Initializer::Ones.init([self.d_model], device),
            bias: self.bias.then(|| Initializer::Zeros.init([self.d_model], device)),
            eps: self.eps,
        }
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension (PyTorch `nn.LayerNorm`).
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale, `[d_model]`.
    pub weight: Param<Tensor<1>>,
    /// Shift, `[d_model]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// # Shapes
    /// - input and output: `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let centered = x.clone() - x.mean_dim(D - 1);
        let var = centered.clone().square().mean_dim(D - 1);
        let normed = centered / (var + self.eps).sqrt();
        let normed = normed.cast(dtype) * self.weight.val().unsqueeze();
        match &self.bias {
            Some(bias) => normed + bias.val().unsqueeze(),
            None => normed,
        }
    }
}

/// Configuration of an [`RmsNorm`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsNormConfig {
    /// Normalised features (the last dimension).
    pub d_model: usize,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNormConfig {
    /// Creates the layer (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> RmsNorm {
        RmsNorm { weight: Initializer::Ones.init([self.d_model], device), eps: self.eps }
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension, the statistic in f32
/// (transformers' `Qwen2RMSNorm`, `InternVLVisionRMSNorm`).
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Scale, `[d_model]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// # Shapes
    /// - input and output: `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let inv_rms = (x.clone().square().mean_dim(D - 1) + self.eps).sqrt().recip();
        (x * inv_rms).cast(dtype) * self.weight.val().unsqueeze()
    }
}

/// Configuration of a [`Norm`] whose kind is chosen by the checkpoint's config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormConfig {
    /// LayerNorm (with bias) or RMSNorm.
    pub kind: NormKind,
    /// Normalised features.
    pub d_model: usize,
    /// Epsilon.
    pub eps: f64,
}

impl NormConfig {
    /// Creates the layer (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> Norm {
        match self.kind {
            NormKind::LayerNorm => {
                Norm::LayerNorm(LayerNormConfig { d_model: self.d_model, eps: self.eps, bias: true }.init(device))
            }
            NormKind::RmsNorm => Norm::RmsNorm(RmsNormConfig { d_model: self.d_model, eps: self.eps }.init(device)),
        }
    }
}

/// A LayerNorm or an RMSNorm. Both store `weight` (and LayerNorm `bias`) directly under the
/// module's own name, as checkpoints do.
#[derive(Module, Debug)]
pub enum Norm {
    /// `nn.LayerNorm`.
    LayerNorm(LayerNorm),
    /// RMSNorm.
    RmsNorm(RmsNorm),
}

impl Norm {
    /// # Shapes
    /// - input and output: `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Norm::LayerNorm(norm) => norm.forward(x),
            Norm::RmsNorm(norm) => norm.forward(x),
        }
    }
}
