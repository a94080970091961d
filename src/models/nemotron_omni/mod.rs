//! NVIDIA's Nemotron 3 Nano Omni (`nemotron_h_omni`, transformers'
//! `models/nemotron_h_omni/modeling_nemotron_h_omni.py`): a RADIO vision tower over each image at
//! its own patch grid, InternVL's pixel shuffle (2x2 patches per token), an RMSNorm / relu²
//! projector, and the hybrid Mamba-2 / attention / MoE Nemotron-H decoder. Image features replace
//! the `<image>` tokens; `<img>` / `</img>` around them stay text. The checkpoint's audio tower is
//! not loaded: audio and video inputs are refused by the processor.

pub mod config;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

pub use self::config::NemotronOmniCheckpoint;
use super::{ModelInputs, Pixels, embed_images};
use crate::error::{Error, Result};
use crate::nn::{KvCache, Linear};
use crate::projector::{MultiModalProjector, PixelShuffleVersion, ProjectorConfig, pixel_shuffle};
use crate::text::nemotron_h::{NemotronHConfig, NemotronHModel};
use crate::vision::{RadioVision, RadioVisionConfig};

/// Patches merged per side into one image token (`1 / downsample_ratio`; only 0.5 exists).
pub const MERGE: usize = 2;

/// Everything that defines a Nemotron Omni model.
#[derive(Debug, Clone, PartialEq)]
pub struct NemotronOmniConfig {
    /// The RADIO tower.
    pub vision: RadioVisionConfig,
    /// The projector (RMSNorm, relu², no biases).
    pub projector: ProjectorConfig,
    /// The decoder.
    pub text: NemotronHConfig,
    /// The image token (`<image>`).
    pub image_token_id: u32,
}

impl NemotronOmniConfig {
    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        [self.vision.min_parameters(), self.projector.min_parameters(), self.text.min_parameters()]
            .into_iter()
            .fold(0, u128::saturating_add)
    }

    /// Creates the model (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> NemotronOmniModel {
        NemotronOmniModel {
            vision_model: self.vision.init(device),
            multi_modal_projector: self.projector.init(device),
            language_model: self.text.init(device),
            lm_head: self.text.lm_head(device),
            config: self.clone(),
        }
    }
}

/// A Nemotron Omni model: vision tower, projector, decoder and output projection.
#[derive(Module, Debug)]
pub struct NemotronOmniModel {
    /// The RADIO tower.
    pub vision_model: RadioVision,
    /// Shuffled vision features -> decoder embeddings.
    pub multi_modal_projector: MultiModalProjector,
    /// The decoder (without output projection).
    pub language_model: NemotronHModel,
    /// Output projection; `None` when tied to the embeddings.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    config: NemotronOmniConfig,
}

impl NemotronOmniModel {
    /// The configuration the model was built from.
    pub fn config(&self) -> &NemotronOmniConfig {
        &self.config
    }

    /// The patch grid `(rows, cols)` of each image of `pixels`, checked against the tower.
    fn grids(&self, pixels: &Pixels) -> Result<(Tensor<2>, Vec<(usize, usize)>)> {
        let Pixels::Patches { values, visuals } = pixels else {
            return Err(Error::Input("pixels in the wrong layout for the RADIO tower".into()));
        };
        let mut grids = Vec::with_capacity(visuals.len());
        for visual in visuals {
            let grid = visual.grid;
            if grid.t != 1 || visual.video_seconds_per_patch.is_some() {
                return Err(Error::Input("Nemotron Omni takes still images here, not videos".into()));
            }
            if !grid.h.is_multiple_of(MERGE) || !grid.w.is_multiple_of(MERGE) {
                return Err(Error::Input(format!("a {}x{} patch grid does not split into 2x2 blocks", grid.h, grid.w)));
            }
            grids.push((grid.h, grid.w));
        }
        Ok((values.clone(), grids))
    }

    /// The tower's features, pixel-shuffled per image: `[patches / 4, 4 x vision hidden]`, images
    /// in order, tokens row-major over each image's 2x2 blocks.
    pub fn shuffled_features(&self, pixels: &Pixels) -> Result<Tensor<2>> {
        let (values, grids) = self.grids(pixels)?;
        let features = self.vision_model.features(values, &grids)?;
        let [_, channels] = features.dims();
        let mut start = 0;
        let mut tokens = Vec::with_capacity(grids.len());
        for &(h, w) in &grids {
            let image = features.clone().narrow(0, start, h * w).reshape([1, h, w, channels]);
            let shuffled = pixel_shuffle(image, MERGE, PixelShuffleVersion::V2);
            tokens.push(shuffled.reshape([h * w / (MERGE * MERGE), channels * MERGE * MERGE]));
            start += h * w;
        }
        Ok(Tensor::cat(tokens, 0))
    }

    /// Decoder-ready features of every image, `[total tokens, text_hidden]`, images in order.
    pub fn image_features(&self, pixels: &Pixels) -> Result<Tensor<2>> {
        Ok(self.multi_modal_projector.forward(self.shuffled_features(pixels)?))
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

    /// An empty cache (attention keys and values, Mamba states) for `batch` sequences of up to
    /// `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        self.config.text.new_cache(batch, capacity)
    }
}
