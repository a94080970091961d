//! From vision features to decoder embeddings: pixel shuffle, then the MLP projector
//! (transformers' `InternVLModel.pixel_shuffle` and `InternVLMultiModalProjector`; OpenGVLab's `mlp1`).

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::{Activation, Linear, LinearConfig, Norm, NormConfig, NormKind};

/// OpenGVLab's `ps_version`: v1 omits the final transpose of v2 (transformers always does v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelShuffleVersion {
    /// The original implementation, features in transposed (column-major) order.
    V1,
    /// Row-major order, as every recent checkpoint.
    V2,
}

/// Folds each `factor x factor` block of neighbouring patches into one token with `factor^2` times
/// the channels (a space-to-depth with InternVL's memory order).
///
/// # Shapes
/// - features: `[tiles, side, side, channels]`
/// - output: `[tiles, side / factor, side / factor, channels * factor^2]`
pub fn pixel_shuffle(features: Tensor<4>, factor: usize, version: PixelShuffleVersion) -> Tensor<4> {
    let [tiles, width, height, channels] = features.dims();
    let shuffled = features
        .reshape([tiles, width, height / factor, channels * factor]) // merge pairs along height
        .swap_dims(1, 2) // [tiles, height / f, width, channels * f]
        .reshape([tiles, height / factor, width / factor, channels * factor * factor]);
    match version {
        PixelShuffleVersion::V1 => shuffled,
        PixelShuffleVersion::V2 => shuffled.swap_dims(1, 2), // [tiles, width / f, height / f, channels * f^2]
    }
}

/// Shape of the projector MLP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProjectorConfig {
    /// Width of a pixel-shuffled vision token (`vision hidden * factor^2`).
    pub input_size: usize,
    /// Width of the hidden layer: the decoder width for InternVL, the decoder's MLP width for NVLM-D.
    pub hidden_size: usize,
    /// The decoder width.
    pub output_size: usize,
    /// Whether the two linear layers have biases (NVLM-D's do not).
    pub bias: bool,
    /// The norm of the input: InternVL's LayerNorm, Nemotron Omni's RMSNorm; `None` for none
    /// (LLaVA's projector).
    pub norm: Option<NormKind>,
    /// Its epsilon.
    pub norm_eps: f64,
    /// Activation between the linear layers.
    pub activation: Activation,
}

impl ProjectorConfig {
    /// A lower bound of the parameter count (the two matrices), in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        let (input, hidden, output) = (self.input_size as u128, self.hidden_size as u128, self.output_size as u128);
        input.saturating_mul(hidden).saturating_add(hidden.saturating_mul(output))
    }

    /// Creates the projector (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> MultiModalProjector {
        MultiModalProjector {
            layer_norm: self
                .norm
                .map(|kind| NormConfig { kind, d_model: self.input_size, eps: self.norm_eps }.init(device)),
            linear_1: LinearConfig::new(self.input_size, self.hidden_size, self.bias).init(device),
            linear_2: LinearConfig::new(self.hidden_size, self.output_size, self.bias).init(device),
            activation: self.activation,
        }
    }
}

/// `linear_2(act(linear_1(norm(x))))` (InternVL, Nemotron Omni), or without the norm (LLaVA).
#[derive(Module, Debug)]
pub struct MultiModalProjector {
    /// Norm over the shuffled vision token.
    pub layer_norm: Option<Norm>,
    /// `[hidden, input]`
    pub linear_1: Linear,
    /// `[output, hidden]`
    pub linear_2: Linear,
    #[module(skip)]
    activation: Activation,
}

impl MultiModalProjector {
    /// # Shapes
    /// - input: `[..., input_size]`
    /// - output: `[..., output_size]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = match &self.layer_norm {
            Some(norm) => norm.forward(x),
            None => x,
        };
        let x = self.linear_1.forward(x);
        self.linear_2.forward(self.activation.forward(x))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use super::*;

    /// features[0, w, h, c] = 100 w + 10 h + c on a 4x4 grid with 2 channels.
    fn grid() -> Tensor<4> {
        let device = crate::device::cpu();
        let values: Vec<f32> =
            (0..4).flat_map(|w| (0..4).flat_map(move |h| (0..2).map(move |c| (100 * w + 10 * h + c) as f32))).collect();
        Tensor::from_data(TensorData::new(values, [1, 4, 4, 2]), &device)
    }

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn pixel_shuffle_v2_folds_2x2_blocks_row_major() {
        let out = pixel_shuffle(grid(), 2, PixelShuffleVersion::V2);
        assert_eq!(out.dims(), [1, 2, 2, 8]);
        // First token: the block w in {0, 1}, h in {0, 1}, ordered (w0 h0, w0 h1, w1 h0, w1 h1) x channels.
        assert_eq!(values(out.clone())[..8], [0., 1., 10., 11., 100., 101., 110., 111.]);
        // Second token along the second axis: h in {2, 3}.
        assert_eq!(values(out)[8..16], [20., 21., 30., 31., 120., 121., 130., 131.]);
    }

    #[test]
    fn pixel_shuffle_v1_is_v2_transposed() {
        let v1 = pixel_shuffle(grid(), 2, PixelShuffleVersion::V1);
        let v2 = pixel_shuffle(grid(), 2, PixelShuffleVersion::V2);
        assert_eq!(values(v1), values(v2.swap_dims(1, 2)));
    }
}
