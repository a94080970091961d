//! The Llava layout of transformers (`LlavaForConditionalGeneration`,
//! `models/llava/modeling_llava.py`): a vision tower whose selected hidden states go through a
//! two-layer GELU projector and replace the image tokens of a Llama-family decoder. Two towers:
//! Pixtral's (Pixtral-12B on Mistral NeMo: images at their own size, `[IMG_BREAK]` / `[IMG_END]`
//! tokens stay text) and CLIP's (LLaVA-1.5 on Vicuna).

pub mod config;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

pub use self::config::LlavaCheckpoint;
use super::{ModelInputs, Pixels, embed_images};
use crate::error::{Error, Result};
use crate::nn::{KvCache, Linear};
use crate::projector::{MultiModalProjector, ProjectorConfig};
use crate::text::{TextConfig, TextModel};
use crate::vision::{ClipVision, ClipVisionConfig, PixtralVision, PixtralVisionConfig};

/// Which vision tower a Llava checkpoint has.
#[derive(Debug, Clone, PartialEq)]
pub enum LlavaVisionConfig {
    /// Pixtral's (`model_type: pixtral`).
    Pixtral(PixtralVisionConfig),
    /// CLIP's (`model_type: clip_vision_model`).
    Clip(ClipVisionConfig),
}

impl LlavaVisionConfig {
    /// Width of the tower.
    pub fn hidden_size(&self) -> usize {
        match self {
            LlavaVisionConfig::Pixtral(config) => config.hidden_size,
            LlavaVisionConfig::Clip(config) => config.hidden_size,
        }
    }

    /// Blocks of the tower.
    pub fn num_hidden_layers(&self) -> usize {
        match self {
            LlavaVisionConfig::Pixtral(config) => config.num_hidden_layers,
            LlavaVisionConfig::Clip(config) => config.num_hidden_layers,
        }
    }

    /// Attention heads of the tower.
    pub fn num_attention_heads(&self) -> usize {
        match self {
            LlavaVisionConfig::Pixtral(config) => config.num_attention_heads,
            LlavaVisionConfig::Clip(config) => config.num_attention_heads,
        }
    }

    /// Inner width of the tower's MLPs.
    pub fn intermediate_size(&self) -> usize {
        match self {
            LlavaVisionConfig::Pixtral(config) => config.intermediate_size,
            LlavaVisionConfig::Clip(config) => config.intermediate_size,
        }
    }

    /// Colour channels the tower takes.
    pub fn num_channels(&self) -> usize {
        match self {
            LlavaVisionConfig::Pixtral(config) => config.num_channels,
            LlavaVisionConfig::Clip(config) => config.num_channels,
        }
    }

    /// Side of a patch in pixels.
    pub fn patch_size(&self) -> usize {
        match self {
            LlavaVisionConfig::Pixtral(config) => config.patch_size,
            LlavaVisionConfig::Clip(config) => config.patch_size,
        }
    }

    fn min_parameters(&self) -> u128 {
        match self {
            LlavaVisionConfig::Pixtral(config) => config.min_parameters(),
            LlavaVisionConfig::Clip(config) => config.min_parameters(),
        }
    }
}

/// Whether the first token of the selected features is dropped (`vision_feature_select_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelection {
    /// `default`: drop token 0 (CLIP's CLS).
    Default,
    /// `full`: keep every token.
    Full,
}

/// Everything that defines a Llava model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    /// The vision tower.
    pub vision: LlavaVisionConfig,
    /// The projector MLP (no norm).
    pub projector: ProjectorConfig,
    /// The decoder.
    pub text: TextConfig,
    /// Hidden states of the tower the projector reads, as `hidden_states[i]` indexes them
    /// (0 = the blocks' input, -1 = the last block's output), concatenated in this order.
    pub feature_layers: Vec<i64>,
    /// Whether token 0 of each image's features is dropped.
    pub selection: FeatureSelection,
    /// The image token (`<image>`, Pixtral's `[IMG]`).
    pub image_token_id: u32,
}

impl LlavaConfig {
    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        [self.vision.min_parameters(), self.projector.min_parameters(), self.text.min_parameters()]
            .into_iter()
            .fold(0, u128::saturating_add)
    }

    /// The tower's hidden-state indexes the projector reads, resolved (0..=layers).
    pub fn feature_indexes(&self) -> Vec<usize> {
        let states = self.vision.num_hidden_layers() as i64 + 1;
        self.feature_layers.iter().map(|&i| if i < 0 { (states + i) as usize } else { i as usize }).collect()
    }

    /// Creates the model (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> LlavaModel {
        LlavaModel {
            vision_tower: match &self.vision {
                LlavaVisionConfig::Pixtral(config) => LlavaVision::Pixtral(config.init(device)),
                LlavaVisionConfig::Clip(config) => LlavaVision::Clip(config.init(device)),
            },
            multi_modal_projector: self.projector.init(device),
            language_model: self.text.init(device),
            lm_head: self.text.lm_head(device),
            config: self.clone(),
        }
    }
}

/// The vision tower of a Llava model.
#[allow(clippy::large_enum_variant)] // one per model: its size does not matter
#[derive(Module, Debug)]
pub enum LlavaVision {
    /// Pixtral's.
    Pixtral(PixtralVision),
    /// CLIP's.
    Clip(ClipVision),
}

/// A Llava-layout model: vision tower, projector, decoder and output projection.
#[derive(Module, Debug)]
pub struct LlavaModel {
    /// The vision tower.
    pub vision_tower: LlavaVision,
    /// Selected vision features -> decoder embeddings.
    pub multi_modal_projector: MultiModalProjector,
    /// The decoder (without output projection).
    pub language_model: TextModel,
    /// Output projection; `None` when tied to the embeddings.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    config: LlavaConfig,
}

impl LlavaModel {
    /// The configuration the model was built from.
    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    /// The tower's selected hidden states, concatenated over the feature layers (channel axis)
    /// and with token 0 dropped under the `default` strategy: one `[tokens, features]` per image
    /// (transformers' `get_image_features` before the projector).
    pub fn selected_features(&self, pixels: &Pixels) -> Result<Vec<Tensor<2>>> {
        let indexes = self.config.feature_indexes();
        let deepest = indexes.iter().copied().max().unwrap_or(0);
        let drop_first = usize::from(self.config.selection == FeatureSelection::Default);
        match (&self.vision_tower, pixels) {
            (LlavaVision::Pixtral(tower), Pixels::Images(images)) => {
                // One sequence of every image's patches (the config refuses `default` here, which
                // would drop the first patch of the whole sequence), split per image.
                let states = tower.hidden_states(images, deepest)?;
                let selected = Tensor::cat(indexes.iter().map(|&i| states[i].clone()).collect(), 1);
                let p = tower.config().patch_size;
                let mut start = 0;
                let mut out = Vec::with_capacity(images.len());
                for image in images {
                    let [_, height, width] = image.dims();
                    let patches = (height / p) * (width / p);
                    out.push(selected.clone().narrow(0, start, patches));
                    start += patches;
                }
                Ok(out)
            }
            (LlavaVision::Clip(tower), Pixels::Tiles(values)) => {
                let states = tower.hidden_states(values.clone(), deepest)?;
                let selected = Tensor::cat(indexes.iter().map(|&i| states[i].clone()).collect(), 2);
                let [images, tokens, width] = selected.dims();
                let selected = selected.narrow(1, drop_first, tokens - drop_first);
                Ok((0..images)
                    .map(|i| selected.clone().narrow(0, i, 1).reshape([tokens - drop_first, width]))
                    .collect())
            }
            _ => Err(Error::Input("pixels in the wrong layout for this vision tower".into())),
        }
    }

    /// Decoder-ready features of every image, `[total tokens, text_hidden]`, images in order.
    pub fn image_features(&self, pixels: &Pixels) -> Result<Tensor<2>> {
        let selected = Tensor::cat(self.selected_features(pixels)?, 0);
        Ok(self.multi_modal_projector.forward(selected))
    }

    /// Embeds the inputs (image features over the image tokens), runs the decoder (appending to
    /// `cache`) and returns the final hidden states.
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, text_hidden]`
    pub fn hidden_states(&self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<Tensor<3>> {
        let embeds = self.language_model.embed(&inputs.input_ids)?;
        let embeds = embed_images(embeds, inputs, self.config.image_token_id, |pixels| self.image_features(pixels))?;
        self.language_model.forward(embeds, cache)
    }

    /// Projects hidden states to vocabulary logits.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq_len, text_hidden]`
    /// - output: `[batch, seq_len, vocab]`
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(lm_head) => lm_head.forward(hidden),
            None => self.language_model.tied_logits(hidden),
        }
    }

    /// An empty KV cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        self.config.text.new_cache(batch, capacity)
    }
}
