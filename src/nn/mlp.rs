//! The gated MLP of Llama-family decoders: `down(act(gate(x)) * up(x))`.

use burn::module::Module;
use burn::tensor::activation::{gelu, silu};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::quant::QuantKind;
use super::{Linear, LinearConfig};

/// Activation functions named by checkpoints' `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(x)` (`"silu"`, also spelled `"swish"`).
    #[serde(alias = "swish")]
    Silu,
    /// The exact, erf-based GELU (`"gelu"`).
    Gelu,
    /// `x * sigmoid(1.702 x)` (`"quick_gelu"`, CLIP).
    QuickGelu,
    /// GELU's tanh approximation (`"gelu_pytorch_tanh"`, also `"gelu_new"`):
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
    #[serde(alias = "gelu_new")]
    GeluPytorchTanh,
    /// `relu(x)^2` (`"relu2"`, Nemotron).
    #[serde(rename = "relu2")]
    Relu2,
}

impl Activation {
    /// Applies the activation element-wise.
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Silu => silu(x),
            Activation::Gelu => gelu(x),
            Activation::QuickGelu => x.clone() * burn::tensor::activation::sigmoid(x * 1.702),
            Activation::Relu2 => burn::tensor::activation::relu(x).powi_scalar(2),
            Activation::GeluPytorchTanh => {
                let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
                x * (inner.tanh() + 1.0) * 0.5
            }
        }
    }
}

/// Configuration of a [`GatedMlp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatedMlpConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Inner width.
    pub intermediate_size: usize,
    /// Activation of the gate.
    pub activation: Activation,
    /// Whether the three projections have biases (`mlp_bias`).
    pub bias: bool,
    /// Whether (and how) the three projections' weights are quantized.
    pub quantization: Option<QuantKind>,
}

impl GatedMlpConfig {
    /// Creates the block (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> GatedMlp {
        let up = LinearConfig::new(self.hidden_size, self.intermediate_size, self.bias).quantized(self.quantization);
        let down = LinearConfig::new(self.intermediate_size, self.hidden_size, self.bias).quantized(self.quantization);
        GatedMlp {
            gate_proj: up.init(device),
            up_proj: up.init(device),
            down_proj: down.init(device),
            activation: self.activation,
        }
    }
}

/// SwiGLU feed-forward block (transformers' `Qwen2MLP`, `LlamaMLP`).
#[derive(Module, Debug)]
pub struct GatedMlp {
    /// `[intermediate, hidden]`
    pub gate_proj: Linear,
    /// `[intermediate, hidden]`
    pub up_proj: Linear,
    /// `[hidden, intermediate]`
    pub down_proj: Linear,
    /// Activation applied to the gate.
    #[module(skip)]
    pub activation: Activation,
}

impl GatedMlp {
    /// # Shapes
    /// - input and output: `[batch, seq_len, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = self.activation.forward(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}
