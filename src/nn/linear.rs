//! A linear layer with its weight stored `[d_input, d_output]`, contiguous: the layout matmuls
//! read fastest (on the CPU backend a transposed view costs ~5x per decode step). Checkpoints
//! store PyTorch's `[d_output, d_input]`; the loader transposes once, at load.

use burn::module::{Initializer, Module, Param};
use burn::tensor::{Device, Tensor};

/// Configuration of a [`Linear`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether the layer adds a bias.
    pub bias: bool,
}

impl LinearConfig {
    /// A layer from `d_input` to `d_output` features.
    pub fn new(d_input: usize, d_output: usize, bias: bool) -> Self {
        Self { d_input, d_output, bias }
    }

    /// Creates the layer with lazily initialised (never materialised until used) parameters,
    /// which the weight loader replaces.
    pub fn init(&self, device: &Device) -> Linear {
        Linear {
            weight: Initializer::Zeros.init([self.d_input, self.d_output], device),
            bias: self.bias.then(|| Initializer::Zeros.init([self.d_output], device)),
        }
    }
}

/// `y = x W + b` (PyTorch's `nn.Linear`, whose `[d_output, d_input]` weight is stored here
/// transposed).
#[derive(Module, Debug)]
pub struct Linear {
    /// Weight, `[d_input, d_output]`.
    pub weight: Param<Tensor<2>>,
    /// Optional bias, `[d_output]`.
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        burn::tensor::module::linear(input, self.weight.val(), self.bias.as_ref().map(|bias| bias.val()))
    }
}
