//! Complete models, one folder per family, and [`Model`], the family enum that the facade, the
//! generator and the loader work with. A family combines blocks from `vision`, `projector` and
//! `text`; everything specific to it (its config mirror, how image features reach the decoder)
//! lives in its folder.

pub mod internvl;
pub mod llava;
pub mod nemotron_omni;
pub mod qwen_vl;

use burn::module::Module;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

pub use internvl::{InternVlConfig, InternVlModel, InternVlVariant};
pub use llava::{LlavaConfig, LlavaModel};
pub use nemotron_omni::{NemotronOmniConfig, NemotronOmniModel};
pub use qwen_vl::{QwenVlConfig, QwenVlModel, QwenVlVariant};

use crate::error::{Error, Result};
use crate::nn::KvCache;
use crate::text::TextConfig;
use crate::vision::qwen_grid::VisualGrid;

/// Pixels for one forward pass, laid out as the family's vision tower takes them.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Pixels {
    /// Normalised tiles `[tiles, 3, size, size]` of every image, in prompt order (InternVL).
    Tiles(Tensor<4>),
    /// Normalised images at their own sizes, `[3, height, width]` each, in prompt order (Pixtral).
    Images(Vec<Tensor<3>>),
    /// Flattened patches `[patches, channels * temporal * patch^2]` of every image and video, in
    /// prompt order: each in merge-block order (Qwen-VL), or row-major (Nemotron Omni, `t` 1).
    Patches {
        /// The patches.
        values: Tensor<2>,
        /// The grid of each image or video, in the same order.
        visuals: Vec<PatchGrid>,
    },
}

/// The patch grid of one image or video of a Qwen-VL or Nemotron Omni prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PatchGrid {
    /// `t x h x w` patches.
    pub grid: VisualGrid,
    /// For a video, the seconds one temporal patch spans (temporal patch size / sampled fps).
    pub video_seconds_per_patch: Option<f64>,
}

impl Pixels {
    /// Joins the pixels of several prompts of one batch, in row order.
    pub fn cat(parts: Vec<Pixels>) -> Result<Option<Pixels>> {
        let Some(first) = parts.first() else { return Ok(None) };
        let mixed = || Error::Input("pixels of different layouts in one batch".into());
        match first {
            Pixels::Tiles(_) => {
                let tiles = parts.into_iter().map(|part| match part {
                    Pixels::Tiles(tiles) => Ok(tiles),
                    _ => Err(mixed()),
                });
                Ok(Some(Pixels::Tiles(Tensor::cat(tiles.collect::<Result<_>>()?, 0))))
            }
            Pixels::Images(_) => {
                let mut images = Vec::new();
                for part in parts {
                    match part {
                        Pixels::Images(part) => images.extend(part),
                        _ => return Err(mixed()),
                    }
                }
                Ok(Some(Pixels::Images(images)))
            }
            Pixels::Patches { .. } => {
                let mut values = Vec::with_capacity(parts.len());
                let mut visuals = Vec::new();
                for part in parts {
                    match part {
                        Pixels::Patches { values: v, visuals: g } => {
                            values.push(v);
                            visuals.extend(g);
                        }
                        _ => return Err(mixed()),
                    }
                }
                Ok(Some(Pixels::Patches { values: Tensor::cat(values, 0), visuals }))
            }
        }
    }
}

/// Token ids and pixels for one forward pass.
#[derive(Debug, Clone)]
pub struct ModelInputs {
    /// One row of token ids per sequence; all rows the same length (left-pad shorter prompts and
    /// declare the padding in the [`KvCache`]).
    pub input_ids: Vec<Vec<u32>>,
    /// Every image of every row, in the order their image tokens appear (row by row).
    pub pixels: Option<Pixels>,
}

/// A vision-language model of any supported family: what [`crate::Vlm`], the generator and the
/// loader work with. A burn `Module`, so loading, mapping and quantization see the whole model.
#[derive(Module, Debug)]
#[non_exhaustive]
pub enum Model {
    /// InternVL 2 / 2.5 / 3 and NVLM-D.
    InternVl(InternVlModel),
    /// Qwen2.5-VL and Qwen3-VL (NVIDIA's Cosmos-Reason1 and Cosmos-Reason2).
    QwenVl(QwenVlModel),
    /// The Llava layout: Pixtral-12B and LLaVA-1.5.
    Llava(LlavaModel),
    /// NVIDIA's Nemotron 3 Nano Omni (images; its audio tower is not loaded).
    NemotronOmni(NemotronOmniModel),
}

impl Model {
    /// Embeds the inputs (image features in place of the image tokens), runs the decoder
    /// (appending to `cache`) and returns the final hidden states.
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, text_hidden]`
    pub fn hidden_states(&self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<Tensor<3>> {
        crate::device::on_compute_pool(&self.device(), || match self {
            Model::InternVl(model) => model.forward_embeds(model.embed_inputs(inputs)?, cache),
            Model::QwenVl(model) => model.hidden_states(inputs, cache),
            Model::Llava(model) => model.hidden_states(inputs, cache),
            Model::NemotronOmni(model) => model.hidden_states(inputs, cache),
        })
    }

    /// Projects hidden states to vocabulary logits.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq_len, text_hidden]`
    /// - output: `[batch, seq_len, vocab]`
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        crate::device::on_compute_pool(&self.device(), || match self {
            Model::InternVl(model) => model.logits(hidden),
            Model::QwenVl(model) => model.logits(hidden),
            Model::Llava(model) => model.logits(hidden),
            Model::NemotronOmni(model) => model.logits(hidden),
        })
    }

    /// Logits for every position ([`hidden_states`](Self::hidden_states), then
    /// [`logits`](Self::logits)).
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, vocab]`
    pub fn forward(&self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<Tensor<3>> {
        Ok(self.logits(self.hidden_states(inputs, cache)?))
    }

    /// An empty cache (attention keys and values, and recurrent states where the decoder has
    /// them) for `batch` sequences of up to `capacity` tokens. On a GPU its attention reads every
    /// slot, its capacity rounded up to a step ([`KvCache::for_device`]): decode steps keep one
    /// shape, so their kernels compile and autotune once per generation rather than once per token.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let cache = match self {
            Model::InternVl(model) => model.config().text.new_cache(batch, capacity),
            Model::QwenVl(model) => model.new_cache(batch, capacity),
            Model::Llava(model) => model.new_cache(batch, capacity),
            Model::NemotronOmni(model) => model.new_cache(batch, capacity),
        };
        cache.for_device(&self.device())
    }

    /// The configuration of a Llama-family (transformer) decoder, if the model has one (Nemotron
    /// Omni's hybrid decoder is not).
    pub fn text_config(&self) -> Option<&TextConfig> {
        match self {
            Model::InternVl(model) => Some(&model.config().text),
            Model::QwenVl(model) => Some(&model.config().text),
            Model::Llava(model) => Some(&model.config().text),
            Model::NemotronOmni(_) => None,
        }
    }

    /// The longest sequence the decoder is meant for, in tokens.
    pub fn context_length(&self) -> usize {
        match self {
            Model::NemotronOmni(model) => model.config().text.max_position_embeddings,
            _ => self.text_config().map_or(0, TextConfig::context_length),
        }
    }

    /// Token ids whose embeddings image features replace (never a padding token).
    pub fn image_token_ids(&self) -> Vec<u32> {
        match self {
            Model::InternVl(model) => model.config().image_token_id.into_iter().collect(),
            Model::QwenVl(model) => vec![model.config().image_token_id, model.config().video_token_id],
            Model::Llava(model) => vec![model.config().image_token_id],
            Model::NemotronOmni(model) => vec![model.config().image_token_id],
        }
    }

    /// The device holding the weights.
    pub fn device(&self) -> Device {
        match self {
            Model::InternVl(model) => model.language_model.device(),
            Model::QwenVl(model) => model.language_model.device(),
            Model::Llava(model) => model.language_model.device(),
            Model::NemotronOmni(model) => model.language_model.device(),
        }
    }

    /// Bytes the parameters occupy as stored (quantized weights at their packed size).
    pub fn parameter_bytes(&self) -> usize {
        crate::nn::parameter_bytes(self)
    }

    /// The InternVL-family model, if this is one.
    pub fn as_internvl(&self) -> Option<&InternVlModel> {
        match self {
            Model::InternVl(model) => Some(model),
            _ => None,
        }
    }

    /// The Qwen-VL model, if this is one.
    pub fn as_qwen_vl(&self) -> Option<&QwenVlModel> {
        match self {
            Model::QwenVl(model) => Some(model),
            _ => None,
        }
    }

    /// The Llava-layout model (Pixtral, LLaVA), if this is one.
    pub fn as_llava(&self) -> Option<&LlavaModel> {
        match self {
            Model::Llava(model) => Some(model),
            _ => None,
        }
    }

    /// The Nemotron Omni model, if this is one.
    pub fn as_nemotron_omni(&self) -> Option<&NemotronOmniModel> {
        match self {
            Model::NemotronOmni(model) => Some(model),
            _ => None,
        }
    }
}

/// The decoder's input embeddings with image features over the tokens `image_token_id`:
/// `features` runs only when the inputs carry pixels; image tokens without pixels are an error.
///
/// # Shapes
/// - embeds and output: `[batch, seq_len, hidden]`
pub(crate) fn embed_images(
    embeds: Tensor<3>,
    inputs: &ModelInputs,
    image_token_id: u32,
    features: impl FnOnce(&Pixels) -> Result<Tensor<2>>,
) -> Result<Tensor<3>> {
    let rows: Vec<usize> = inputs
        .input_ids
        .iter()
        .flatten()
        .enumerate()
        .filter(|&(_, &id)| id == image_token_id)
        .map(|(i, _)| i)
        .collect();
    match &inputs.pixels {
        None if rows.is_empty() => Ok(embeds),
        None => Err(Error::InputMismatch { image_tokens: rows.len(), image_features: 0 }),
        Some(pixels) => scatter_features(embeds, features(pixels)?, &rows, "vision tower and projector"),
    }
}

/// Writes image features over the embeddings of the image tokens at `positions` (flat,
/// row-major over batch and sequence; transformers' `masked_scatter`), after checking that there
/// is one feature per token and that the features are finite (one boolean read back per prompt:
/// NaN weights or pixels would otherwise surface only as garbage tokens). `stage` names the
/// features in the error.
///
/// # Shapes
/// - embeds: `[batch, seq_len, hidden]`, features: `[positions.len(), hidden]`
pub(crate) fn scatter_features(
    embeds: Tensor<3>,
    features: Tensor<2>,
    positions: &[usize],
    stage: &'static str,
) -> Result<Tensor<3>> {
    let [count, _] = features.dims();
    if positions.len() != count {
        return Err(Error::InputMismatch { image_tokens: positions.len(), image_features: count });
    }
    if !features.clone().is_finite().all().into_scalar::<bool>() {
        return Err(Error::NonFinite { stage });
    }
    let [batch, seq_len, hidden] = embeds.dims();
    let n = batch * seq_len;
    let device = embeds.device();
    // For each row, the feature that replaces it (0 where none does, masked off below).
    let mut source = vec![0i64; n];
    let mut replaced = vec![false; n];
    for (feature, &row) in positions.iter().enumerate() {
        source[row] = feature as i64;
        replaced[row] = true;
    }
    let source = Tensor::<1, Int>::from_data(TensorData::new(source, [n]), &device);
    let replaced = Tensor::<2, Bool>::from_data(TensorData::new(replaced, [n, 1]), &device).expand([n, hidden]);
    let gathered = features.cast(embeds.dtype()).select(0, source);
    let rows = embeds.reshape([n, hidden]).mask_where(replaced, gathered);
    Ok(rows.reshape([batch, seq_len, hidden]))
}
