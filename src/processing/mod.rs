//! From a conversation of text and images to the `input_ids` and `pixel_values` the model takes,
//! as the reference processor computes them: decode, convert to RGB, tile, resize, normalise;
//! render the checkpoint's chat template; expand image placeholders; tokenize.
//!
//! Processing never touches weights; the model never touches strings.

pub mod chat;
pub mod image;
pub mod message;
pub mod prompt;
mod sentencepiece;
pub mod tiling;
pub mod tokenizer;

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;

pub use self::chat::{ChatTemplate, TemplateMessage};
pub use self::image::{AlphaMode, Image, ImageLimits, Normalization};
pub use self::message::{Content, Message, Role};
pub use self::prompt::ImagePlaceholders;
pub use self::tiling::{Grid, TilingConfig};
pub use self::tokenizer::Tokenizer;
use crate::config::{CheckpointConfig, CheckpointLayout};
use crate::error::{Error, Result};
use crate::models::{InternVlVariant, ModelInputs};

/// Everything that decides how a conversation becomes model inputs, read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// How images appear in prompts.
    pub placeholders: ImagePlaceholders,
    /// How images are cut into tiles.
    pub tiling: TilingConfig,
    /// Rescaling and normalisation of pixel values.
    pub normalization: Normalization,
    /// How transparent pixels become RGB.
    pub alpha: AlphaMode,
    /// Image-context tokens per tile.
    pub tokens_per_tile: usize,
    /// Token id of the image-context token.
    pub image_token_id: u32,
    /// Longest prompt the model accepts, in tokens.
    pub max_context: usize,
}

/// Per-call settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessOptions {
    /// Overrides the checkpoint's most tiles per image (bounds memory and compute).
    pub max_tiles: Option<usize>,
    /// Overrides the checkpoint's fewest tiles per image.
    pub min_tiles: Option<usize>,
    /// End the prompt with the assistant's turn opener.
    pub add_generation_prompt: bool,
    /// Move each message's images before its text, as InternVL's model cards write prompts
    /// (harnesses such as lmms-eval send the question first).
    pub images_first: bool,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        Self { max_tiles: None, min_tiles: None, add_generation_prompt: true, images_first: false }
    }
}

/// A message's parts in prompt order: as given, or images first.
fn ordered_parts(message: &Message, images_first: bool) -> Vec<&Content> {
    let mut parts: Vec<&Content> = message.content.iter().collect();
    if images_first {
        parts.sort_by_key(|part| !matches!(part, Content::Image(_))); // stable: keeps each kind's order
    }
    parts
}

/// How one image was tiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTiles {
    /// The grid chosen for it.
    pub grid: Grid,
    /// Tiles it contributes, thumbnail included.
    pub tiles: usize,
}

/// A processed conversation.
#[derive(Debug, Clone)]
pub struct Encoding {
    /// Token ids, image-context tokens included.
    pub input_ids: Vec<u32>,
    /// Every tile of every image, in prompt order, `[tiles, 3, tile_size, tile_size]`, normalised.
    pub pixel_values: Vec<f32>,
    /// Side of a tile in pixels.
    pub tile_size: usize,
    /// How each image was tiled, in prompt order.
    pub images: Vec<ImageTiles>,
    /// The rendered chat template, before image placeholders were expanded.
    pub prompt: String,
}

impl Encoding {
    /// Tiles of all images together.
    pub fn num_tiles(&self) -> usize {
        self.images.iter().map(|image| image.tiles).sum()
    }

    /// The pixel values as a tensor, `None` without images.
    pub fn pixel_values(&self, device: &Device) -> Option<Tensor<4>> {
        (!self.images.is_empty()).then(|| {
            let shape = [self.num_tiles(), 3, self.tile_size, self.tile_size];
            Tensor::from_data(TensorData::new(self.pixel_values.clone(), shape), device)
        })
    }

    /// Inputs for one sequence.
    pub fn to_model_inputs(&self, device: &Device) -> ModelInputs {
        ModelInputs { input_ids: vec![self.input_ids.clone()], pixel_values: self.pixel_values(device) }
    }
}

/// Turns conversations into model inputs for one checkpoint.
#[derive(Debug)]
pub struct Processor {
    config: ProcessorConfig,
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

impl Processor {
    /// Reads the tokenizer, chat template and image settings of a checkpoint directory.
    pub fn from_dir(dir: &Path, checkpoint: &CheckpointConfig) -> Result<Self> {
        let tokenizer = Tokenizer::from_dir(dir)?;
        let template = ChatTemplate::from_dir(dir)?
            .ok_or_else(|| Error::Template(format!("{} has no chat template", dir.display())))?;
        let config = processor_config(dir, checkpoint, &tokenizer)?;
        Ok(Self { config, tokenizer, template })
    }

    /// Assembles a processor from its parts.
    pub fn new(config: ProcessorConfig, tokenizer: Tokenizer, template: ChatTemplate) -> Self {
        Self { config, tokenizer, template }
    }

    /// The settings in use.
    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Processes a conversation. Every check on the input (image count, prompt length) happens
    /// here, before any model compute.
    pub fn encode(&self, messages: &[Message], options: &ProcessOptions) -> Result<Encoding> {
        if messages.is_empty() {
            return Err(Error::Input("a conversation needs at least one message".into()));
        }
        let tiling = self.tiling(options)?;
        let prompt = self.render_with(messages, options)?;
        let image_count = messages.iter().map(|m| m.images().count()).sum::<usize>();
        let placeholders = prompt.matches(self.config.placeholders.placeholder()).count();
        if placeholders != image_count {
            return Err(Error::ImageCount { images: image_count, placeholders });
        }

        // Moving images before text keeps their order among themselves, so this is prompt order.
        // How many tiles each image makes follows from its size alone: the prompt is tokenized
        // and checked against the context before any pixel is resized.
        let images: Vec<ImageTiles> = messages
            .iter()
            .flat_map(Message::images)
            .map(|image| {
                let (grid, tiles) = tiling::tile_layout(image.width(), image.height(), &tiling);
                ImageTiles { grid, tiles }
            })
            .collect();
        let tiles_per_image: Vec<usize> = images.iter().map(|image| image.tiles).collect();
        // The image tokens alone may already be over the context: say so before writing them out.
        let image_tokens = tiles_per_image.iter().sum::<usize>().saturating_mul(self.config.tokens_per_tile);
        if image_tokens > self.config.max_context {
            return Err(Error::ContextOverflow { requested: image_tokens, limit: self.config.max_context });
        }
        let text = self.config.placeholders.expand(&prompt, &tiles_per_image, self.config.tokens_per_tile)?;
        let input_ids = self.tokenizer.encode(&text)?;
        if input_ids.len() > self.config.max_context {
            return Err(Error::ContextOverflow { requested: input_ids.len(), limit: self.config.max_context });
        }
        let image_tokens = input_ids.iter().filter(|&&id| id == self.config.image_token_id).count();
        let features = tiles_per_image.iter().sum::<usize>() * self.config.tokens_per_tile;
        if image_tokens != features {
            // The text itself contained image-context tokens.
            return Err(Error::InputMismatch { image_tokens, image_features: features });
        }

        let size = tiling.tile_size as usize;
        let mut pixel_values = Vec::with_capacity(tiles_per_image.iter().sum::<usize>() * 3 * size * size);
        for image in messages.iter().flat_map(Message::images) {
            let rgb = image.rgb8(self.config.alpha);
            let (_, tiles) = tiling::split_into_tiles(&rgb, &tiling);
            for tile in &tiles {
                self.config.normalization.extend_chw(tile, &mut pixel_values);
            }
        }
        Ok(Encoding { input_ids, pixel_values, tile_size: size, images, prompt })
    }

    /// Tokens that end the assistant's turn, for checkpoints that do not name their end-of-sequence
    /// tokens in `generation_config.json`: the special token the chat template writes right after
    /// an assistant message (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3) and the tokenizer's
    /// `eos_token`.
    pub fn end_of_turn_token_ids(&self) -> Vec<u32> {
        const PROBE: &str = "vlm-end-of-turn-probe";
        let mut ids = Vec::new();
        let conversation = [Message::user().text("Hi"), Message::assistant().text(PROBE)];
        if let Ok(rendered) = self.render(&conversation, false)
            && let Some(at) = rendered.rfind(PROBE)
            && let Ok(after) = self.tokenizer.encode(&rendered[at + PROBE.len()..])
        {
            // The first special token, if only whitespace comes before it.
            for id in after {
                if self.tokenizer.is_special(id) {
                    ids.push(id);
                    break;
                }
                if !self.tokenizer.decode(&[id], false).is_ok_and(|text| text.trim().is_empty()) {
                    break;
                }
            }
        }
        let eos = self.tokenizer.eos_token().and_then(|token| self.tokenizer.token_id(token));
        ids.extend(eos.filter(|id| !ids.contains(id)));
        ids
    }

    /// The checkpoint's template applied to the conversation, image placeholders not yet expanded.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, &ProcessOptions { add_generation_prompt, ..ProcessOptions::default() })
    }

    fn render_with(&self, messages: &[Message], options: &ProcessOptions) -> Result<String> {
        let placeholders = &self.config.placeholders;
        let image_count = messages.iter().map(|m| m.images().count()).sum::<usize>();
        let mut image_index = 0;
        let rendered: Vec<TemplateMessage> = messages
            .iter()
            .map(|message| {
                let parts = ordered_parts(message, options.images_first);
                let content = if placeholders.structured_content() {
                    let parts = parts.iter().map(|part| match part {
                        Content::Text(text) => serde_json::json!({"type": "text", "text": text}),
                        Content::Image(_) => serde_json::json!({"type": "image"}),
                    });
                    serde_json::Value::Array(parts.collect())
                } else {
                    let mut text = String::new();
                    for part in parts {
                        match part {
                            Content::Text(part) => text.push_str(part),
                            Content::Image(_) => {
                                text.push_str(&placeholders.marker_text(image_index, image_count));
                                image_index += 1;
                            }
                        }
                    }
                    serde_json::Value::String(text)
                };
                let role = serde_json::to_value(message.role).ok().and_then(|r| r.as_str().map(String::from));
                TemplateMessage { role: role.unwrap_or_default(), content }
            })
            .collect();
        let (bos, eos) = (self.tokenizer.bos_token(), self.tokenizer.eos_token());
        self.template.render(&rendered, options.add_generation_prompt, bos, eos)
    }

    fn tiling(&self, options: &ProcessOptions) -> Result<TilingConfig> {
        let mut tiling = self.config.tiling;
        tiling.max_tiles = options.max_tiles.unwrap_or(tiling.max_tiles);
        tiling.min_tiles = options.min_tiles.unwrap_or(tiling.min_tiles);
        if tiling.min_tiles == 0 || tiling.min_tiles > tiling.max_tiles || tiling.max_tiles > tiling::MAX_TILES {
            return Err(Error::Input(format!(
                "tile limits must satisfy 1 <= min_tiles <= max_tiles <= {}, got {}..={}",
                tiling::MAX_TILES,
                tiling.min_tiles,
                tiling.max_tiles
            )));
        }
        Ok(tiling)
    }
}

/// `preprocessor_config.json` (or the `image_processor` of `processor_config.json`) of
/// transformers' GotOcr2ImageProcessor, and the normalisation fields of OpenGVLab's CLIP one.
#[derive(Deserialize, Default)]
struct ImageProcessorJson {
    size: Option<SizeJson>,
    min_patches: Option<usize>,
    max_patches: Option<usize>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    rescale_factor: Option<f32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeJson {
    Square(u32),
    HeightWidth { height: u32, width: u32 },
}

fn read_image_processor(dir: &Path) -> Result<Option<ImageProcessorJson>> {
    let flat = dir.join("preprocessor_config.json");
    let nested = dir.join("processor_config.json");
    let read = |path: &Path| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
    };
    let (path, value) = if flat.exists() {
        (flat.clone(), read(&flat)?)
    } else if nested.exists() {
        match read(&nested)?.get("image_processor") {
            Some(value) => (nested.clone(), value.clone()),
            None => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    serde_json::from_value(value).map(Some).map_err(|source| Error::Json { path, source })
}

fn processor_config(dir: &Path, checkpoint: &CheckpointConfig, tokenizer: &Tokenizer) -> Result<ProcessorConfig> {
    let model = &checkpoint.model;
    let json = read_image_processor(dir)?.unwrap_or_default();
    let vision_size = model.vision.image_size as u32;
    let normalization = Normalization {
        rescale_factor: json.rescale_factor.unwrap_or(1.0 / 255.0),
        mean: json.image_mean.unwrap_or(Normalization::IMAGENET.mean),
        std: json.image_std.unwrap_or(Normalization::IMAGENET.std),
    };
    let (placeholders, tiling, alpha) = match checkpoint.layout {
        CheckpointLayout::Transformers => {
            let extra = tokenizer_extra_tokens(dir)?;
            let token =
                |key: &str, default: &str| extra.get(key).and_then(|v| v.as_str()).unwrap_or(default).to_string();
            let placeholders = ImagePlaceholders::Transformers {
                start: token("start_image_token", "<img>"),
                context: token("context_image_token", "<IMG_CONTEXT>"),
                end: token("end_image_token", "</img>"),
            };
            let tile_size = match json.size {
                Some(SizeJson::Square(side)) => side,
                Some(SizeJson::HeightWidth { height, width }) if height == width => height,
                Some(SizeJson::HeightWidth { height, width }) => {
                    return Err(Error::config(
                        dir.join("preprocessor_config.json"),
                        format!("tile size {height}x{width} is not square"),
                    ));
                }
                None => vision_size,
            };
            let tiling = TilingConfig {
                tile_size,
                // InternVLProcessor passes `crop_to_patches=True` over the image processor's own
                // setting (its default images_kwargs), so checkpoints saying `false` still tile.
                dynamic: true,
                min_tiles: json.min_patches.unwrap_or(1),
                max_tiles: json.max_patches.unwrap_or(12),
                use_thumbnail: true,
            };
            (placeholders, tiling, AlphaMode::CompositeOnWhite)
        }
        CheckpointLayout::OpenGvLab | CheckpointLayout::OpenGvLabInternLm2 => {
            let defaults = checkpoint.tiling.unwrap_or(crate::config::TilingDefaults {
                dynamic: true,
                min_tiles: 1,
                max_tiles: 12,
                use_thumbnail: true,
            });
            let placeholders = match model.variant {
                InternVlVariant::InternVl => ImagePlaceholders::InternVl,
                InternVlVariant::NvlmD => ImagePlaceholders::NvlmD,
            };
            let tiling = TilingConfig {
                tile_size: vision_size,
                dynamic: defaults.dynamic,
                min_tiles: defaults.min_tiles,
                max_tiles: defaults.max_tiles,
                use_thumbnail: defaults.use_thumbnail,
            };
            (placeholders, tiling, AlphaMode::Discard)
        }
    };
    let fail = |message: String| Err(Error::config(dir.join("preprocessor_config.json"), message));
    if normalization.std.iter().any(|s| !s.is_finite() || *s == 0.0) {
        return fail(format!("image_std {:?} must be finite and non-zero", normalization.std));
    }
    if normalization.mean.iter().any(|m| !m.is_finite()) {
        return fail(format!("image_mean {:?} must be finite", normalization.mean));
    }
    if !(normalization.rescale_factor.is_finite() && normalization.rescale_factor > 0.0) {
        return fail(format!("rescale_factor {} must be a finite number > 0", normalization.rescale_factor));
    }
    if tiling.min_tiles == 0 || tiling.min_tiles > tiling.max_tiles || tiling.max_tiles > tiling::MAX_TILES {
        return fail(format!(
            "tile limits must satisfy 1 <= min <= max <= {}, got {}..={}",
            tiling::MAX_TILES,
            tiling.min_tiles,
            tiling.max_tiles
        ));
    }
    if tiling.tile_size != vision_size {
        return Err(Error::config(
            dir.join("preprocessor_config.json"),
            format!("tiles of {} pixels, but the vision tower takes {vision_size}", tiling.tile_size),
        ));
    }
    let context_token = model.variant.image_context_token();
    let image_token_id = tokenizer
        .token_id(context_token)
        .ok_or_else(|| Error::Tokenizer(format!("the tokenizer has no {context_token} token")))?;
    if let Some(configured) = model.image_token_id.filter(|&id| id != image_token_id) {
        return Err(Error::config(
            dir.join("config.json"),
            format!("image_token_id {configured} differs from the tokenizer's {context_token} ({image_token_id})"),
        ));
    }
    Ok(ProcessorConfig {
        placeholders,
        tiling,
        normalization,
        alpha,
        tokens_per_tile: model.tokens_per_tile(),
        image_token_id,
        max_context: model.text.context_length(),
    })
}

fn tokenizer_extra_tokens(dir: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(serde_json::Map::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path, source })?;
    // transformers 5 writes the named tokens at the top level (`start_image_token`, ...); earlier
    // files keep them in an `extra_special_tokens` map.
    let mut named = match config.get("extra_special_tokens") {
        Some(serde_json::Value::Object(named)) => named.clone(),
        _ => serde_json::Map::new(),
    };
    for key in ["start_image_token", "context_image_token", "end_image_token"] {
        if let Some(value) = config.get(key) {
            named.insert(key.to_string(), value.clone());
        }
    }
    Ok(named)
}
