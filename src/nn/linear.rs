//! A linear layer with its weight stored `[d_input, d_output]`, contiguous: the layout matmuls
//! read fastest (on the CPU backend a transposed view costs ~5x per decode step). Checkpoints
//! store PyTorch's `[d_output, d_input]`; the loader transposes once, at load. The weight may
//! instead be quantized to 8 or 4 bits ([`QuantKind`]), which the loader does tensor by tensor.

use burn::module::{Initializer, Module, Param, ParamId};
use burn::tensor::{DType, Device, Int, Shape, Tensor, TensorCreationOptions, TensorData};

use super::quant::{PackedWeight, QuantKind};

/// Rows of input up to which a quantized layer multiplies with the packed weights directly (decode
/// steps); longer inputs dequantize the weight once and use the backend's matmul.
const PACKED_ROWS: usize = 32;

/// Configuration of a [`Linear`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether the layer adds a bias.
    pub bias: bool,
    /// Whether (and how) the weight is quantized.
    pub quantization: Option<QuantKind>,
}

impl LinearConfig {
    /// A dense layer from `d_input` to `d_output` features.
    pub fn new(d_input: usize, d_output: usize, bias: bool) -> Self {
        Self { d_input, d_output, bias, quantization: None }
    }

    /// The same layer with its weight quantized, where its shape allows (`d_input` a multiple of
    /// the block); otherwise it stays dense.
    pub fn quantized(mut self, kind: Option<QuantKind>) -> Self {
        self.quantization = kind.filter(|kind| kind.fits(self.d_input, self.d_output));
        self
    }

    /// Creates the layer with lazily initialised (never materialised until used) parameters,
    /// which the weight loader replaces.
    pub fn init(&self, device: &Device) -> Linear {
        let (d_input, d_output) = (self.d_input, self.d_output);
        let weight = match self.quantization {
            None => LinearWeight::Dense(Initializer::Zeros.init([d_input, d_output], device)),
            Some(kind) => LinearWeight::Quantized(QuantizedWeight {
                values: lazy_bytes(PackedWeight::values_len(kind, d_input, d_output), device),
                scales: Initializer::Zeros.init([PackedWeight::scales_len(d_input, d_output)], device),
                kind,
                d_input,
                d_output,
            }),
        };
        Linear { weight, bias: self.bias.then(|| Initializer::Zeros.init([d_output], device)) }
    }
}

/// A parameter of `len` bytes that the loader fills (never allocated before).
fn lazy_bytes(len: usize, device: &Device) -> Param<Tensor<1, Int>> {
    let shape = Shape::new([len]);
    Param::uninitialized(
        ParamId::new(),
        move |device, _| bytes_tensor(vec![0u8; len], device),
        device.clone(),
        false,
        shape,
    )
}

/// Bytes as a `u8` tensor (not widened to the device's int dtype).
pub(crate) fn bytes_tensor(bytes: Vec<u8>, device: &Device) -> Tensor<1, Int> {
    let len = bytes.len();
    Tensor::from_data(TensorData::new(bytes, [len]), TensorCreationOptions::new(device.clone()).with_dtype(DType::U8))
}

/// Floats as an `f32` tensor, whatever the device's float dtype.
pub(crate) fn f32_tensor(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), TensorCreationOptions::new(device.clone()).with_dtype(DType::F32))
}

/// `y = x W + b` (PyTorch's `nn.Linear`, whose `[d_output, d_input]` weight is stored here
/// transposed).
#[derive(Module, Debug)]
pub struct Linear {
    /// The weight.
    pub weight: LinearWeight,
    /// Optional bias, `[d_output]`.
    pub bias: Option<Param<Tensor<1>>>,
}

/// How a [`Linear`] layer stores its weight.
#[derive(Module, Debug)]
pub enum LinearWeight {
    /// In the model's float dtype, `[d_input, d_output]`.
    Dense(Param<Tensor<2>>),
    /// Quantized in blocks.
    Quantized(QuantizedWeight),
}

/// A weight quantized in blocks ([`PackedWeight`]'s layout), with its scales.
#[derive(Module, Debug)]
pub struct QuantizedWeight {
    /// The packed levels, as bytes.
    pub values: Param<Tensor<1, Int>>,
    /// The scales, f32.
    pub scales: Param<Tensor<1>>,
    #[module(skip)]
    kind: QuantKind,
    #[module(skip)]
    d_input: usize,
    #[module(skip)]
    d_output: usize,
}

impl Linear {
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(|bias| bias.val());
        match &self.weight {
            LinearWeight::Dense(weight) => {
                let weight = weight.val();
                match super::gemv::linear(&input, &weight, bias.as_ref()) {
                    Some(output) => output,
                    None => burn::tensor::module::linear(input, weight, bias),
                }
            }
            LinearWeight::Quantized(weight) => {
                let output = weight.forward(input);
                match bias {
                    Some(bias) => output.clone() + bias.cast(output.dtype()).unsqueeze(),
                    None => output,
                }
            }
        }
    }
}

impl QuantizedWeight {
    /// The grid of the levels.
    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let dims = input.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let device = input.device();
        let dtype = input.dtype();
        let mut out_dims = dims;
        out_dims[D - 1] = self.d_output;
        let x = input.reshape([rows, self.d_input]);
        let values = self.values.val();
        let scales = self.scales.val();
        let flex = (
            values.clone().try_into_primitive::<burn_flex::Flex>(),
            scales.clone().try_into_primitive::<burn_flex::Flex>(),
        );
        let output = match flex {
            (Ok(values), Ok(scales)) if values.dtype() == DType::U8 && scales.dtype() == DType::F32 => {
                let (values, scales) = (values.to_contiguous(), scales.to_contiguous());
                let packed = PackedWeight {
                    kind: self.kind,
                    d_input: self.d_input,
                    d_output: self.d_output,
                    values: values.bytes().into(),
                    scales: scales.storage::<f32>().into(),
                };
                if rows <= PACKED_ROWS {
                    let x = x.cast(DType::F32).into_data().convert::<f32>();
                    let x = x.as_slice::<f32>().expect("converted to f32 above");
                    let y = packed.matmul(x, rows);
                    Tensor::<2>::from_data(TensorData::new(y, [rows, self.d_output]), &device).cast(dtype)
                } else {
                    let weight = TensorData::new(packed.dequantize(), [self.d_input, self.d_output]);
                    x.matmul(Tensor::<2>::from_data(weight, &device).cast(dtype))
                }
            }
            // Other backends: the weight dequantized on the host, then their matmul.
            _ => {
                let values = values.into_data().convert::<u8>();
                let scales = scales.into_data().convert::<f32>();
                let packed = PackedWeight {
                    kind: self.kind,
                    d_input: self.d_input,
                    d_output: self.d_output,
                    values: values.as_slice::<u8>().expect("converted above").into(),
                    scales: scales.as_slice::<f32>().expect("converted above").into(),
                };
                let weight = TensorData::new(packed.dequantize(), [self.d_input, self.d_output]);
                x.matmul(Tensor::<2>::from_data(weight, &device).cast(dtype))
            }
        };
        output.reshape(out_dims)
    }
}
