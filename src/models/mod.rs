//! Complete models, one folder per family, and [`Model`], the family enum that the facade, the
//! generator and the loader work with. A family combines blocks from `vision`, `projector` and
//! `text`; everything specific to it (its config mirror, how image features reach the decoder)
//! lives in its folder.

pub mod internvl;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

pub use internvl::{InternVlConfig, InternVlModel, InternVlVariant};

use crate::error::Result;
use crate::nn::KvCache;
use crate::text::TextConfig;

/// Pixels for one forward pass, laid out as the family's vision tower takes them.
#[derive(Debug, Clone)]
pub enum Pixels {
    /// Normalised tiles `[tiles, 3, size, size]` of every image, in prompt order (InternVL).
    Tiles(Tensor<4>),
}

impl Pixels {
    /// Joins the pixels of several prompts of one batch, in row order.
    pub fn cat(parts: Vec<Pixels>) -> Option<Pixels> {
        let tiles: Vec<Tensor<4>> = parts.into_iter().map(|Pixels::Tiles(tiles)| tiles).collect();
        (!tiles.is_empty()).then(|| Pixels::Tiles(Tensor::cat(tiles, 0)))
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
pub enum Model {
    /// InternVL 2 / 2.5 / 3 and NVLM-D.
    InternVl(InternVlModel),
}

impl Model {
    /// Embeds the inputs (image features in place of the image tokens), runs the decoder
    /// (appending to `cache`) and returns the final hidden states.
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, text_hidden]`
    pub fn hidden_states(&self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<Tensor<3>> {
        match self {
            Model::InternVl(model) => model.forward_embeds(model.embed_inputs(inputs)?, cache),
        }
    }

    /// Projects hidden states to vocabulary logits.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq_len, text_hidden]`
    /// - output: `[batch, seq_len, vocab]`
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match self {
            Model::InternVl(model) => model.logits(hidden),
        }
    }

    /// Logits for every position ([`hidden_states`](Self::hidden_states), then
    /// [`logits`](Self::logits)).
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, vocab]`
    pub fn forward(&self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<Tensor<3>> {
        Ok(self.logits(self.hidden_states(inputs, cache)?))
    }

    /// An empty KV cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        self.text_config().new_cache(batch, capacity)
    }

    /// The decoder's configuration.
    pub fn text_config(&self) -> &TextConfig {
        match self {
            Model::InternVl(model) => &model.config().text,
        }
    }

    /// Token ids whose embeddings image features replace (never a padding token).
    pub fn image_token_ids(&self) -> Vec<u32> {
        match self {
            Model::InternVl(model) => model.config().image_token_id.into_iter().collect(),
        }
    }

    /// The device holding the weights.
    pub fn device(&self) -> Device {
        match self {
            Model::InternVl(model) => model.language_model.device(),
        }
    }

    /// The InternVL-family model, if this is one.
    pub fn as_internvl(&self) -> Option<&InternVlModel> {
        match self {
            Model::InternVl(model) => Some(model),
        }
    }
}
