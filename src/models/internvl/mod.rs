//! InternVL 2 / 2.5 / 3 and NVIDIA's NVLM-D: InternViT -> drop CLS -> pixel shuffle -> MLP
//! projector -> Qwen2 / Llama decoder, image features replacing the image-context token embeddings
//! (transformers' `models/internvl/modeling_internvl.py`: `InternVLForConditionalGeneration`).

use burn::module::Module;
use burn::tensor::{Device, Tensor};

pub mod config;

pub use self::config::{CheckpointLayout, InternVlCheckpoint, TilingDefaults};
use super::{ModelInputs, Pixels, scatter_features};
use crate::error::{Error, Result};
use crate::nn::{KvCache, Linear, NormKind};
use crate::projector::{MultiModalProjector, PixelShuffleVersion, ProjectorConfig, pixel_shuffle};
use crate::text::{TextConfig, TextModel};
use crate::vision::{InternVit, InternVitConfig};

/// Which member of the family a checkpoint is; decides prompt format details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InternVlVariant {
    /// InternVL 2 / 2.5 / 3: `<img>` + `<IMG_CONTEXT>` x N + `</img>`.
    InternVl,
    /// NVLM-D: tile tags around `<|vision_pad|>` runs.
    NvlmD,
}

impl InternVlVariant {
    /// The token whose positions receive image features, as spelled in the tokenizer.
    pub fn image_context_token(self) -> &'static str {
        match self {
            InternVlVariant::InternVl => "<IMG_CONTEXT>",
            InternVlVariant::NvlmD => "<|vision_pad|>",
        }
    }
}

/// Everything that defines an InternVL-family model, in the canonical (transformers) terms.
#[derive(Debug, Clone, PartialEq)]
pub struct InternVlConfig {
    /// InternVL or NVLM-D.
    pub variant: InternVlVariant,
    /// The vision tower.
    pub vision: InternVitConfig,
    /// The projector MLP.
    pub projector: ProjectorConfig,
    /// The decoder.
    pub text: TextConfig,
    /// Pixel-shuffle factor: `1 / downsample_ratio` (2: 2x2 patches per token).
    pub shuffle_factor: usize,
    /// OpenGVLab's `ps_version`.
    pub pixel_shuffle: PixelShuffleVersion,
    /// Vision feature layer as in `hidden_states[select_layer]`: -1 is the last layer's output.
    pub select_layer: i64,
    /// Token id of the image-context token (read from config.json or the tokenizer).
    pub image_token_id: Option<u32>,
}

impl InternVlConfig {
    /// A tiny model for unit tests.
    pub fn tiny() -> Self {
        let vision = InternVitConfig::tiny();
        let text = TextConfig::tiny();
        Self {
            variant: InternVlVariant::InternVl,
            projector: ProjectorConfig {
                input_size: vision.hidden_size * 4,
                hidden_size: text.hidden_size,
                output_size: text.hidden_size,
                bias: true,
                norm: Some(NormKind::LayerNorm),
                norm_eps: 1e-5,
                activation: crate::nn::Activation::Gelu,
            },
            vision,
            text,
            shuffle_factor: 2,
            pixel_shuffle: PixelShuffleVersion::V2,
            select_layer: -1,
            image_token_id: Some(127),
        }
    }

    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        let parts = [self.vision.min_parameters(), self.projector.min_parameters(), self.text.min_parameters()];
        parts.into_iter().fold(0, u128::saturating_add)
    }

    /// Vision layers to run for the configured `select_layer`.
    pub fn vision_layers_used(&self) -> usize {
        let layers = self.vision.num_hidden_layers as i64;
        let used = if self.select_layer < 0 { layers + 1 + self.select_layer } else { self.select_layer };
        used.clamp(0, layers) as usize
    }

    /// Image tokens (features) per tile.
    pub fn tokens_per_tile(&self) -> usize {
        let side = self.vision.patches_per_side() / self.shuffle_factor;
        side * side
    }

    /// Creates the model (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> InternVlModel {
        InternVlModel {
            vision_tower: self.vision.init(device),
            multi_modal_projector: self.projector.init(device),
            language_model: self.text.init(device),
            lm_head: self.text.lm_head(device),
            config: self.clone(),
        }
    }
}

/// An InternVL-family model: vision tower, projector, decoder and output projection.
#[derive(Module, Debug)]
pub struct InternVlModel {
    /// InternViT.
    pub vision_tower: InternVit,
    /// Pixel-shuffled features -> decoder embeddings.
    pub multi_modal_projector: MultiModalProjector,
    /// The decoder (without output projection).
    pub language_model: TextModel,
    /// Output projection; `None` when tied to the embeddings.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    config: InternVlConfig,
}

impl InternVlModel {
    /// The configuration the model was built from.
    pub fn config(&self) -> &InternVlConfig {
        &self.config
    }

    /// The vision tower's output at the selected feature layer, CLS token included.
    ///
    /// # Shapes
    /// - pixel_values: `[tiles, 3, size, size]`
    /// - output: `[tiles, 1 + patches, vision_hidden]`
    pub fn vision_hidden_state(&self, pixel_values: Tensor<4>) -> Result<Tensor<3>> {
        self.vision_tower.forward(pixel_values, self.config.vision_layers_used())
    }

    /// Image features ready to replace image-context token embeddings.
    ///
    /// # Shapes
    /// - pixel_values: `[tiles, 3, size, size]`
    /// - output: `[tiles, tokens_per_tile, text_hidden]`
    pub fn image_features(&self, pixel_values: Tensor<4>) -> Result<Tensor<3>> {
        let hidden = self.vision_hidden_state(pixel_values)?;
        let [tiles, tokens, channels] = hidden.dims();
        let side = self.config.vision.patches_per_side();
        let factor = self.config.shuffle_factor;
        // drop CLS, then [tiles, patches, C] -> [tiles, side, side, C]
        let patches = hidden.narrow(1, 1, tokens - 1).reshape([tiles, side, side, channels]);
        let shuffled = pixel_shuffle(patches, factor, self.config.pixel_shuffle);
        // [tiles, side / f, side / f, C f^2] -> [tiles, tokens_per_tile, C f^2]
        let tokens_per_tile = self.config.tokens_per_tile();
        let shuffled = shuffled.reshape([tiles, tokens_per_tile, channels * factor * factor]);
        Ok(self.multi_modal_projector.forward(shuffled))
    }

    /// Token embeddings with image features written over the image-context tokens.
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, text_hidden]`
    pub fn embed_inputs(&self, inputs: &ModelInputs) -> Result<Tensor<3>> {
        let embeds = self.language_model.embed(&inputs.input_ids)?;
        let image_token = self.config.image_token_id;
        // Flat (row-major) positions of the image-context tokens.
        let positions: Vec<usize> = match image_token {
            Some(token) => {
                let ids = inputs.input_ids.iter().flatten();
                ids.enumerate().filter(|&(_, &id)| id == token).map(|(i, _)| i).collect()
            }
            None => Vec::new(),
        };
        let pixel_values = match inputs.pixels.clone() {
            Some(Pixels::Tiles(tiles)) => Some(tiles),
            Some(_) => return Err(Error::Input("InternVL takes image tiles".into())),
            None => None,
        };
        let Some(pixel_values) = pixel_values else {
            if positions.is_empty() {
                return Ok(embeds);
            }
            return Err(Error::InputMismatch { image_tokens: positions.len(), image_features: 0 });
        };
        if image_token.is_none() {
            return Err(Error::Input("images given, but the model's image-context token id is unknown".into()));
        }
        let features = self.image_features(pixel_values)?;
        let [tiles, per_tile, hidden] = features.dims();
        scatter_features(embeds, features.reshape([tiles * per_tile, hidden]), &positions, "vision tower and projector")
    }

    /// Runs the decoder over embeddings, appending to `cache`, and returns the final hidden states.
    ///
    /// # Shapes
    /// - inputs_embeds: `[batch, seq_len, text_hidden]`
    /// - output: `[batch, seq_len, text_hidden]`
    pub fn forward_embeds(&self, inputs_embeds: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<3>> {
        self.language_model.forward(inputs_embeds, cache)
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

    /// Embeds the inputs, runs the decoder (appending to `cache`) and returns logits for every
    /// position.
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, vocab]`
    pub fn forward(&self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<Tensor<3>> {
        let embeds = self.embed_inputs(inputs)?;
        Ok(self.logits(self.forward_embeds(embeds, cache)?))
    }

    /// An empty KV cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        self.config.text.new_cache(batch, capacity)
    }
}
