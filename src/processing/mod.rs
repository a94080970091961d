//! From a conversation of text and images to the `input_ids` and `pixel_values` the model takes,
//! as the reference processor computes them: decode, convert to RGB, tile, resize, normalise;
//! render the checkpoint's chat template; expand image placeholders; tokenize.
//!
//! Processing never touches weights; the model never touches strings.

pub mod chat;
pub mod encoding;
pub mod image;
pub mod internvl;
pub mod llava;
pub mod message;
pub mod nemotron_omni;
pub mod pixtral;
pub mod prompt;
pub mod qwen_vl;
mod sentencepiece;
pub mod tiling;
pub mod tokenizer;
pub mod video;

use std::path::{Path, PathBuf};

pub use self::chat::{ChatTemplate, TemplateMessage};
pub use self::encoding::{Encoding, VideoTiming, Visual};
pub use self::image::{AlphaMode, Image, ImageLimits, Normalization};
pub use self::internvl::InternVlImages;
pub use self::llava::LlavaImages;
pub use self::message::{Content, Media, Message, Role};
pub use self::nemotron_omni::NemotronOmniImages;
pub use self::pixtral::PixtralImages;
pub use self::prompt::ImagePlaceholders;
pub use self::qwen_vl::QwenVlImages;
pub use self::tiling::{Grid, TilingConfig};
pub use self::tokenizer::Tokenizer;
pub use self::video::Video;
use crate::config::{CheckpointConfig, FamilyConfig};
use crate::error::{Error, Result};
use crate::models::llava::LlavaVisionConfig;

/// The family-specific part of a processor: how images become pixel values and prompt text.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ImageProcessor {
    /// InternVL and NVLM-D: dynamic tiles.
    InternVl(InternVlImages),
    /// Qwen2.5-VL and Qwen3-VL: patches of a size-preserving resize.
    QwenVl(QwenVlImages),
    /// Pixtral: each image whole, at its own size.
    Pixtral(PixtralImages),
    /// LLaVA-1.5: one centre crop per image.
    Llava(LlavaImages),
    /// Nemotron Omni: each image whole, stretched to its own patch grid.
    NemotronOmni(NemotronOmniImages),
}

impl ImageProcessor {
    /// Reads the image settings of a checkpoint directory.
    pub fn from_dir(dir: &Path, checkpoint: &CheckpointConfig, tokenizer: &Tokenizer) -> Result<Self> {
        match &checkpoint.family {
            FamilyConfig::InternVl(internvl) => Ok(Self::InternVl(InternVlImages::from_dir(dir, internvl, tokenizer)?)),
            FamilyConfig::QwenVl(qwen) => Ok(Self::QwenVl(QwenVlImages::from_dir(dir, qwen, tokenizer)?)),
            FamilyConfig::Llava(llava) => match llava.model.vision {
                LlavaVisionConfig::Pixtral(_) => Ok(Self::Pixtral(PixtralImages::from_dir(dir, llava, tokenizer)?)),
                LlavaVisionConfig::Clip(_) => Ok(Self::Llava(LlavaImages::from_dir(dir, llava, tokenizer)?)),
            },
            FamilyConfig::NemotronOmni(omni) => {
                Ok(Self::NemotronOmni(NemotronOmniImages::from_dir(dir, omni, tokenizer)?))
            }
        }
    }

    /// Whether messages reach the chat template as structured parts (`[{"type": "image"}, ...]`)
    /// rather than one string with markers.
    fn structured_content(&self) -> bool {
        match self {
            ImageProcessor::InternVl(images) => images.placeholders.structured_content(),
            ImageProcessor::QwenVl(_)
            | ImageProcessor::Pixtral(_)
            | ImageProcessor::Llava(_)
            | ImageProcessor::NemotronOmni(_) => true,
        }
    }

    /// Whether a message without images or videos reaches the template as one string even where
    /// others are structured: Pixtral's template concatenates system and assistant contents as
    /// strings.
    fn text_only_as_string(&self) -> bool {
        matches!(self, ImageProcessor::Pixtral(_))
    }

    /// What the `index`-th (0-based) of `count` images writes into a string message.
    fn marker_text(&self, index: usize, count: usize) -> String {
        match self {
            ImageProcessor::InternVl(images) => images.placeholders.marker_text(index, count),
            ImageProcessor::QwenVl(images) => images.image_token.clone(),
            ImageProcessor::Pixtral(images) => images.image_token.clone(),
            ImageProcessor::Llava(images) => images.image_token.clone(),
            ImageProcessor::NemotronOmni(images) => images.image_token.clone(),
        }
    }

    /// How each image or video is cut up, from its size alone (no pixel is touched).
    fn plan(&self, media: &[Media], options: &ProcessOptions) -> Result<Vec<Visual>> {
        match self {
            ImageProcessor::InternVl(internvl) => internvl.plan(&still_images(media, "InternVL")?, options),
            ImageProcessor::QwenVl(qwen) => qwen.plan(media, options),
            ImageProcessor::Pixtral(pixtral) => pixtral.plan(&still_images(media, "Pixtral")?),
            ImageProcessor::Llava(llava) => llava.plan(&still_images(media, "LLaVA")?),
            ImageProcessor::NemotronOmni(omni) => omni.plan(media, options),
        }
    }

    /// The rendered prompt with each image's placeholder expanded to its tokens' text.
    fn expand(&self, rendered: &str, visuals: &[Visual]) -> Result<String> {
        match self {
            ImageProcessor::InternVl(internvl) => internvl.expand(rendered, visuals),
            ImageProcessor::QwenVl(qwen) => qwen.expand(rendered, visuals),
            ImageProcessor::Pixtral(pixtral) => pixtral.expand(rendered, visuals),
            ImageProcessor::Llava(llava) => llava.expand(rendered, visuals),
            ImageProcessor::NemotronOmni(omni) => omni.expand(rendered, visuals),
        }
    }

    /// The token ids image (and video) features are written over.
    fn image_token_ids(&self) -> Vec<u32> {
        match self {
            ImageProcessor::InternVl(internvl) => vec![internvl.image_token_id],
            ImageProcessor::QwenVl(qwen) => vec![qwen.image_token_id, qwen.video_token_id],
            ImageProcessor::Pixtral(pixtral) => vec![pixtral.image_token_id],
            ImageProcessor::Llava(llava) => vec![llava.image_token_id],
            ImageProcessor::NemotronOmni(omni) => vec![omni.image_token_id],
        }
    }

    /// The pixel values of every image and video, as the family's vision tower takes them.
    fn pixel_values(&self, media: &[Media], visuals: &[Visual], options: &ProcessOptions) -> Result<Vec<f32>> {
        match self {
            ImageProcessor::InternVl(internvl) => {
                internvl.pixel_values(&still_images(media, "InternVL")?, visuals, options)
            }
            ImageProcessor::QwenVl(qwen) => qwen.pixel_values(media, visuals),
            ImageProcessor::Pixtral(pixtral) => pixtral.pixel_values(&still_images(media, "Pixtral")?, visuals),
            ImageProcessor::Llava(llava) => llava.pixel_values(&still_images(media, "LLaVA")?),
            ImageProcessor::NemotronOmni(omni) => omni.pixel_values(&still_images(media, "Nemotron Omni")?, visuals),
        }
    }
}

/// The images of a family that takes no videos.
fn still_images<'a>(media: &[Media<'a>], family: &str) -> Result<Vec<&'a Image>> {
    media
        .iter()
        .map(|item| match item {
            Media::Image(image) => Ok(*image),
            Media::Video(_) => Err(Error::Input(format!("{family} checkpoints take images, not videos"))),
        })
        .collect()
}

/// Per-call settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessOptions {
    /// Overrides the checkpoint's most tiles per image (bounds memory and compute).
    pub max_tiles: Option<usize>,
    /// Overrides the checkpoint's fewest tiles per image.
    pub min_tiles: Option<usize>,
    /// Overrides the checkpoint's fewest pixels an image is resized to (Qwen-VL).
    pub min_pixels: Option<u64>,
    /// Overrides the checkpoint's most pixels an image is resized to (Qwen-VL; bounds memory and
    /// compute).
    pub max_pixels: Option<u64>,
    /// End the prompt with the assistant's turn opener.
    pub add_generation_prompt: bool,
    /// Move each message's images before its text, as InternVL's model cards write prompts
    /// (harnesses such as lmms-eval send the question first).
    pub images_first: bool,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        Self {
            max_tiles: None,
            min_tiles: None,
            min_pixels: None,
            max_pixels: None,
            add_generation_prompt: true,
            images_first: false,
        }
    }
}

/// A message's parts in prompt order: as given, or images first.
fn ordered_parts(message: &Message, images_first: bool) -> Vec<&Content> {
    let mut parts: Vec<&Content> = message.content.iter().collect();
    if images_first {
        parts.sort_by_key(|part| matches!(part, Content::Text(_))); // stable: keeps each kind's order
    }
    parts
}

/// Turns conversations into model inputs for one checkpoint: the chat template and the tokenizer
/// (shared by every family) around the family's [`ImageProcessor`].
#[derive(Debug)]
pub struct Processor {
    images: ImageProcessor,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// Longest prompt the model accepts, in tokens.
    max_context: usize,
}

impl Processor {
    /// Reads the tokenizer, chat template and image settings of a checkpoint directory.
    pub fn from_dir(dir: &Path, checkpoint: &CheckpointConfig) -> Result<Self> {
        let tokenizer = Tokenizer::from_dir(dir)?;
        let template = ChatTemplate::from_dir(dir)?
            .ok_or_else(|| Error::Template(format!("{} has no chat template", dir.display())))?;
        let images = ImageProcessor::from_dir(dir, checkpoint, &tokenizer)?;
        Ok(Self { images, tokenizer, template, max_context: checkpoint.context_length() })
    }

    /// Assembles a processor from its parts.
    pub fn new(images: ImageProcessor, tokenizer: Tokenizer, template: ChatTemplate, max_context: usize) -> Self {
        Self { images, tokenizer, template, max_context }
    }

    /// The family's image settings.
    pub fn images(&self) -> &ImageProcessor {
        &self.images
    }

    /// Longest prompt the model accepts, in tokens.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Processes a conversation. Every check on the input (image count, prompt length) happens
    /// here, before any model compute; pixels are resized only once the prompt is known to fit.
    pub fn encode(&self, messages: &[Message], options: &ProcessOptions) -> Result<Encoding> {
        if messages.is_empty() {
            return Err(Error::Input("a conversation needs at least one message".into()));
        }
        let prompt = self.render_with(messages, options)?;
        // Moving images before text keeps their order among themselves, so this is prompt order.
        let media: Vec<Media> = messages.iter().flat_map(Message::media).collect();
        let visuals = self.images.plan(&media, options)?;
        // The image tokens alone may already be over the context: say so before writing them out.
        let features = visuals.iter().map(Visual::tokens).fold(0, usize::saturating_add);
        if features > self.max_context {
            return Err(Error::ContextOverflow { requested: features, limit: self.max_context });
        }
        let text = self.images.expand(&prompt, &visuals)?;
        let input_ids = self.tokenizer.encode_prompt(&text)?;
        if input_ids.len() > self.max_context {
            return Err(Error::ContextOverflow { requested: input_ids.len(), limit: self.max_context });
        }
        let image_token_ids = self.images.image_token_ids();
        let image_tokens = input_ids.iter().filter(|id| image_token_ids.contains(id)).count();
        if image_tokens != features {
            // The text itself contained image tokens.
            return Err(Error::InputMismatch { image_tokens, image_features: features });
        }
        let pixel_values = self.images.pixel_values(&media, &visuals, options)?;
        Ok(Encoding { input_ids, pixel_values, visuals, prompt })
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
        let image_count = messages.iter().map(|m| m.media().count()).sum::<usize>();
        let mut image_index = 0;
        let rendered: Vec<TemplateMessage> = messages
            .iter()
            .map(|message| {
                let parts = ordered_parts(message, options.images_first);
                let text_only = message.media().next().is_none();
                let content = if self.images.structured_content() && !(text_only && self.images.text_only_as_string()) {
                    // Text parts carry both spellings: "text" (transformers' convention) and
                    // "content" (which Pixtral's template reads).
                    let parts = parts.iter().map(|part| match part {
                        Content::Text(text) => serde_json::json!({"type": "text", "text": text, "content": text}),
                        Content::Image(_) => serde_json::json!({"type": "image"}),
                        Content::Video(_) => serde_json::json!({"type": "video"}),
                    });
                    serde_json::Value::Array(parts.collect())
                } else {
                    let mut text = String::new();
                    for part in parts {
                        match part {
                            Content::Text(part) => text.push_str(part),
                            Content::Image(_) | Content::Video(_) => {
                                text.push_str(&self.images.marker_text(image_index, image_count));
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
}

/// The image processor's settings of a checkpoint parsed as `T` (its defaults when the checkpoint
/// has none), with the file they came from (or would have).
pub(crate) fn image_processor_json<T: serde::de::DeserializeOwned + Default>(dir: &Path) -> Result<(PathBuf, T)> {
    match read_image_processor(dir)? {
        Some((path, value)) => {
            let json = serde_json::from_value(value).map_err(|source| Error::Json { path: path.clone(), source })?;
            Ok((path, json))
        }
        None => Ok((dir.join("preprocessor_config.json"), T::default())),
    }
}

/// A JSON file of the checkpoint parsed as `T`, or `T::default()` when the file is absent.
pub(crate) fn optional_json<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T> {
    if !path.exists() {
        return Ok(T::default());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// The image processor's settings of a checkpoint: `preprocessor_config.json`, or the
/// `image_processor` of `processor_config.json`; with the file it came from.
pub(crate) fn read_image_processor(dir: &Path) -> Result<Option<(PathBuf, serde_json::Value)>> {
    let flat = dir.join("preprocessor_config.json");
    let nested = dir.join("processor_config.json");
    let read = |path: &Path| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
    };
    if flat.exists() {
        return Ok(Some((flat.clone(), read(&flat)?)));
    }
    if nested.exists() {
        return Ok(read(&nested)?.get("image_processor").map(|value| (nested.clone(), value.clone())));
    }
    Ok(None)
}
