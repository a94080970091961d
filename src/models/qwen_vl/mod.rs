//! Qwen2.5-VL and Qwen3-VL (NVIDIA's Cosmos-Reason1 and Cosmos-Reason2, the VLM inside
//! Alpamayo-R1): a vision tower whose merged patch tokens replace the image and video tokens of
//! the prompt, a Qwen2 / Qwen3 decoder with multimodal RoPE (three position rows per token, as
//! `get_rope_index` computes them) and, in Qwen3-VL, DeepStack features added to the first
//! decoder layers (transformers' `models/qwen2_5_vl/modeling_qwen2_5_vl.py`,
//! `models/qwen3_vl/modeling_qwen3_vl.py`).

pub mod config;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

pub use self::config::QwenVlCheckpoint;
use super::{ModelInputs, PatchGrid, Pixels, scatter_features};
use crate::error::{Error, Result};
use crate::nn::{KvCache, Linear};
use crate::text::decoder::DeepStack;
use crate::text::{TextConfig, TextModel};
use crate::vision::qwen_vit::{QwenVisionConfig, QwenVisionTransformer, VisionOutput};

/// Which Qwen-VL generation a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QwenVlVariant {
    /// Qwen2.5-VL (Cosmos-Reason1).
    Qwen2_5,
    /// Qwen3-VL (Cosmos-Reason2).
    Qwen3,
}

/// Everything that defines a Qwen-VL model.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVlConfig {
    /// Qwen2.5-VL or Qwen3-VL.
    pub variant: QwenVlVariant,
    /// The vision tower.
    pub vision: QwenVisionConfig,
    /// The decoder.
    pub text: TextConfig,
    /// `<|image_pad|>`: image features replace these tokens.
    pub image_token_id: u32,
    /// `<|video_pad|>`: video features replace these tokens.
    pub video_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// Qwen2.5-VL: temporal RoPE steps per second of video.
    pub tokens_per_second: f64,
}

impl QwenVlConfig {
    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        self.vision.min_parameters().saturating_add(self.text.min_parameters())
    }

    /// Creates the model (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> QwenVlModel {
        QwenVlModel {
            visual: self.vision.init(device),
            language_model: self.text.init(device),
            lm_head: self.text.lm_head(device),
            config: self.clone(),
        }
    }
}

/// The multimodal positions of a batch of prompts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPositions {
    /// Per row and token, the (temporal, height, width) positions.
    pub positions: Vec<Vec<[usize; 3]>>,
    /// Per row, how far the positions of later tokens run ahead of their count.
    pub offsets: Vec<i64>,
}

/// A Qwen-VL model: vision tower, decoder and output projection.
#[derive(Module, Debug)]
pub struct QwenVlModel {
    /// The vision tower and its mergers.
    pub visual: QwenVisionTransformer,
    /// The decoder (without output projection).
    pub language_model: TextModel,
    /// Output projection; `None` when tied to the embeddings.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    config: QwenVlConfig,
}

impl QwenVlModel {
    /// The configuration the model was built from.
    pub fn config(&self) -> &QwenVlConfig {
        &self.config
    }

    /// The vision tower's output for the patches of several images and videos.
    ///
    /// # Shapes
    /// - values: `[patches, channels * temporal * patch^2]`
    pub fn vision_features(&self, values: Tensor<2>, visuals: &[PatchGrid]) -> Result<VisionOutput> {
        let grids: Vec<_> = visuals.iter().map(|visual| visual.grid).collect();
        self.visual.forward(values, &grids)
    }

    /// Embeds the inputs (vision features over the image and video tokens), runs the decoder with
    /// multimodal positions (appending to `cache`) and returns the final hidden states.
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, text_hidden]`
    pub fn hidden_states(&self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<Tensor<3>> {
        let config = &self.config;
        let mut embeds = self.language_model.embed(&inputs.input_ids)?;
        let visual_tokens = [config.image_token_id, config.video_token_id];
        // Flat (row-major) positions of the image and video tokens.
        let rows: Vec<usize> = inputs
            .input_ids
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, id)| visual_tokens.contains(id))
            .map(|(i, _)| i)
            .collect();
        let (visuals, deepstack) = match &inputs.pixels {
            None if rows.is_empty() => (Vec::new(), None),
            None => return Err(Error::InputMismatch { image_tokens: rows.len(), image_features: 0 }),
            Some(Pixels::Tiles(_) | Pixels::Images(_)) => return Err(Error::Input("Qwen-VL takes patches".into())),
            Some(Pixels::Patches { values, visuals }) => {
                let output = self.vision_features(values.clone(), visuals)?;
                embeds = scatter_features(embeds, output.embeds, &rows, "vision tower and merger")?;
                let deepstack = (!output.deepstack.is_empty())
                    .then(|| DeepStack { features: output.deepstack, rows: rows.clone() });
                (visuals.clone(), deepstack)
            }
        };
        // A prompt gets its positions from its tokens and grids; later tokens continue from the
        // prompt's last position (the offset the cache keeps).
        let positions = if cache.is_empty() {
            let prompt = self.prompt_positions(&inputs.input_ids, cache.left_padding(), &visuals)?;
            cache.set_position_offsets(prompt.offsets)?;
            Some(prompt.positions)
        } else if !visuals.is_empty() {
            return Err(Error::Input("images can only be given with the first forward pass of a cache".into()));
        } else {
            None
        };
        self.language_model.forward_multimodal(embeds, cache, positions.as_deref(), deepstack.as_ref())
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

    /// The three position rows (temporal, height, width) of every prompt token, as transformers'
    /// `get_rope_index` computes them, and each row's offset for the tokens after the prompt
    /// (`generate` continues from the last prompt position + 1). Text advances all rows by one;
    /// a vision run of `t x h x w` patches sits at `start + (time, row, column)` of its merged
    /// grid and moves the text after it on by `max(h, w) / merge`. Padding sits at 0.
    pub fn prompt_positions(
        &self,
        input_ids: &[Vec<u32>],
        left_padding: &[usize],
        visuals: &[PatchGrid],
    ) -> Result<PromptPositions> {
        let config = &self.config;
        let merge = config.vision.spatial_merge_size;
        // Vision runs in prompt order; a Qwen3-VL video is one run per temporal patch (its frames
        // are separated by timestamps in the prompt).
        let mut runs = visuals.iter().flat_map(|visual| {
            let grid = visual.grid;
            let (frames, t) = match (config.variant, visual.video_seconds_per_patch) {
                (QwenVlVariant::Qwen3, Some(_)) => (grid.t, 1),
                _ => (1, grid.t),
            };
            let interval = match (config.variant, visual.video_seconds_per_patch) {
                (QwenVlVariant::Qwen2_5, Some(seconds)) => (config.tokens_per_second * seconds) as f32,
                _ => 1.0,
            };
            std::iter::repeat_n((t, grid.h / merge, grid.w / merge, interval), frames)
        });
        let mut positions = Vec::with_capacity(input_ids.len());
        let mut offsets = Vec::with_capacity(input_ids.len());
        for (ids, &pad) in input_ids.iter().zip(left_padding) {
            let mut row = vec![[0usize; 3]; ids.len()];
            let mut next = 0usize;
            let mut i = pad.min(ids.len());
            while i < ids.len() {
                let id = ids[i];
                if id != config.image_token_id && id != config.video_token_id {
                    row[i] = [next; 3];
                    next += 1;
                    i += 1;
                    continue;
                }
                let Some((t, h, w, interval)) = runs.next() else {
                    return Err(Error::InputMismatch { image_tokens: ids[i..].len(), image_features: 0 });
                };
                let tokens = t * h * w;
                if ids.len() - i < tokens || ids[i..i + tokens].iter().any(|&other| other != id) {
                    return Err(Error::Input(format!(
                        "a run of vision tokens at position {i} is shorter than its {t}x{h}x{w} grid"
                    )));
                }
                let mut slot = i;
                for ti in 0..t {
                    let time = (ti as f32 * interval) as usize;
                    for hi in 0..h {
                        for wi in 0..w {
                            row[slot] = [next + time, next + hi, next + wi];
                            slot += 1;
                        }
                    }
                }
                next += h.max(w);
                i += tokens;
            }
            let unpadded = ids.len().saturating_sub(pad);
            let last = row.last().map_or(0, |last| last[0]);
            offsets.push(if unpadded == 0 { 0 } else { last as i64 + 1 - unpadded as i64 });
            positions.push(row);
        }
        if runs.next().is_some() {
            return Err(Error::Input("more images or videos than vision token runs in the prompt".into()));
        }
        Ok(PromptPositions { positions, offsets })
    }

    /// An empty KV cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        self.config.text.new_cache(batch, capacity)
    }
}
