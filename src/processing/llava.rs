//! LLaVA-1.5's image part of the processor (transformers' `LlavaProcessor` and
//! `CLIPImageProcessor`): the shortest side resized to `shortest_edge` (the other truncated to
//! keep the aspect), antialiased bicubic, a centred `crop_size` square, normalised. In the prompt,
//! each `<image>` the chat template writes becomes one `<image>` per feature the vision tower
//! keeps (`576` for CLIP ViT-L/14 at 336 px under the `default` strategy).

use std::path::Path;

use serde::Deserialize;

use super::image::{AlphaMode, Image, Normalization, NormalizationJson, crop, resize};
use super::pixtral::PatchSizeJson;
use super::tiling::Grid;
use super::{Tokenizer, Visual, image_processor_json, optional_json};
use crate::error::{Error, Result};
use crate::models::llava::{FeatureSelection, LlavaCheckpoint, LlavaVisionConfig};

/// The most elongated image accepted (as Qwen-VL's `smart_resize`).
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// How a LLaVA (CLIP tower) checkpoint turns images into pixels and prompt text.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaImages {
    /// Length the shortest side is resized to.
    pub shortest_edge: usize,
    /// Side of the centred square cropped from the resized image (the tower's input size).
    pub crop_size: usize,
    /// Rescaling and normalisation of pixel values.
    pub normalization: Normalization,
    /// The image token (`<image>`), as text.
    pub image_token: String,
    /// Its id.
    pub image_token_id: u32,
    /// Image tokens per image.
    pub tokens_per_image: usize,
}

/// `preprocessor_config.json` of `CLIPImageProcessor`.
#[derive(Deserialize, Default)]
struct ImageProcessorJson {
    size: Option<ShortestEdgeJson>,
    crop_size: Option<PatchSizeJson>,
    do_center_crop: Option<bool>,
    #[serde(flatten)]
    normalization: NormalizationJson,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ShortestEdgeJson {
    Edge { shortest_edge: usize },
    Square(usize),
}

/// `processor_config.json` of `LlavaProcessor`.
#[derive(Deserialize, Default)]
struct ProcessorJson {
    image_token: Option<String>,
    patch_size: Option<usize>,
    num_additional_image_tokens: Option<usize>,
    vision_feature_select_strategy: Option<String>,
}

impl LlavaImages {
    /// Reads the image settings of a LLaVA checkpoint directory. The image-token count follows
    /// the model's configuration; a `processor_config.json` that disagrees is an error (early
    /// llava-hf snapshots have none, which transformers cannot expand without).
    pub fn from_dir(dir: &Path, checkpoint: &LlavaCheckpoint, tokenizer: &Tokenizer) -> Result<Self> {
        let model = &checkpoint.model;
        let LlavaVisionConfig::Clip(vision) = &model.vision else {
            return Err(Error::config(dir.join("config.json"), "not a CLIP vision tower"));
        };
        let (path, json): (_, ImageProcessorJson) = image_processor_json(dir)?;
        let processor_path = dir.join("processor_config.json");
        let processor: ProcessorJson = optional_json(&processor_path)?;
        let fail = |path: &Path, message: String| Err(Error::config(path, message));
        let crop_size = match json.crop_size {
            Some(size) => size.square(&path)?,
            None => vision.image_size,
        };
        let shortest_edge = match json.size {
            Some(ShortestEdgeJson::Edge { shortest_edge } | ShortestEdgeJson::Square(shortest_edge)) => shortest_edge,
            None => vision.image_size,
        };
        if json.do_center_crop == Some(false) || crop_size != vision.image_size || shortest_edge < crop_size {
            return fail(
                &path,
                format!(
                    "images must be resized to at least and centre-cropped to the tower's {} pixels \
                     (shortest_edge {shortest_edge}, crop {crop_size})",
                    vision.image_size
                ),
            );
        }
        let patches = vision.patches();
        let tokens_per_image = patches + 1 - usize::from(model.selection == FeatureSelection::Default);
        let images = Self {
            shortest_edge,
            crop_size,
            normalization: json.normalization.or(Normalization::OPENAI_CLIP),
            image_token: processor.image_token.unwrap_or_else(|| "<image>".into()),
            image_token_id: model.image_token_id,
            tokens_per_image,
        };
        if let (Some(patch), Some(extra)) = (processor.patch_size, processor.num_additional_image_tokens) {
            let strategy = processor.vision_feature_select_strategy.as_deref().unwrap_or("default");
            let theirs = (crop_size / patch.max(1)).pow(2) + extra - usize::from(strategy == "default");
            if theirs != tokens_per_image {
                return fail(
                    &processor_path,
                    format!("it expands each image to {theirs} tokens, the model makes {tokens_per_image} features"),
                );
            }
        }
        images.normalization.validate().map_err(|message| Error::config(&path, message))?;
        tokenizer.check_token_id(&images.image_token, images.image_token_id, &dir.join("config.json"))?;
        Ok(images)
    }

    /// transformers' shortest-edge resize: `(height, width)` with the short side at
    /// `shortest_edge` and the long side scaled and truncated. Images more than
    /// [`MAX_ASPECT_RATIO`] times as long as wide are refused: the resized image would be huge
    /// and its crop a sliver of it.
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let (short, long) = if width <= height { (width, height) } else { (height, width) };
        if short == 0 || long as f64 / short as f64 > MAX_ASPECT_RATIO {
            return Err(Error::Input(format!(
                "a {width}x{height} image is more than {MAX_ASPECT_RATIO} times as long as it is wide"
            )));
        }
        let new_long = (self.shortest_edge as f64 * long as f64 / short as f64) as usize;
        Ok(if width <= height { (new_long, self.shortest_edge) } else { (self.shortest_edge, new_long) })
    }

    /// One tile per image.
    pub(crate) fn plan(&self, images: &[&Image]) -> Result<Vec<Visual>> {
        let grid = Grid { cols: 1, rows: 1 };
        images
            .iter()
            .map(|image| {
                self.resized_size(image.height() as usize, image.width() as usize)?;
                Ok(Visual::Tiles { grid, tiles: 1, size: self.crop_size, tokens: self.tokens_per_image })
            })
            .collect()
    }

    /// The rendered prompt with each `<image>` repeated once per feature.
    pub(crate) fn expand(&self, rendered: &str, visuals: &[Visual]) -> Result<String> {
        let placeholders = rendered.matches(self.image_token.as_str()).count();
        if placeholders != visuals.len() {
            return Err(Error::ImageCount { images: visuals.len(), placeholders });
        }
        Ok(rendered.replace(self.image_token.as_str(), &self.image_token.repeat(self.tokens_per_image)))
    }

    /// The normalised crops of every image, `[images, 3, crop, crop]` in prompt order.
    pub(crate) fn pixel_values(&self, images: &[&Image]) -> Result<Vec<f32>> {
        let mut values = Vec::with_capacity(images.len() * 3 * self.crop_size * self.crop_size);
        for image in images {
            let rgb = image.rgb8(AlphaMode::CompositeOnWhite);
            let (height, width) = self.resized_size(rgb.height() as usize, rgb.width() as usize)?;
            let resized = resize(&rgb, width as u32, height as u32);
            let top = (height - self.crop_size) / 2;
            let left = (width - self.crop_size) / 2;
            self.normalization.extend_chw(&crop(&resized, left as u32, top as u32, self.crop_size as u32), &mut values);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_resize_truncates_the_long_side() {
        let images = LlavaImages {
            shortest_edge: 336,
            crop_size: 336,
            normalization: Normalization::OPENAI_CLIP,
            image_token: "<image>".into(),
            image_token_id: 32_000,
            tokens_per_image: 576,
        };
        assert_eq!(images.resized_size(480, 640).unwrap(), (336, 448));
        assert_eq!(images.resized_size(640, 480).unwrap(), (448, 336));
        assert_eq!(images.resized_size(41, 300).unwrap(), (336, 2458)); // 336 * 300 / 41 = 2458.5
        assert_eq!(images.resized_size(100, 100).unwrap(), (336, 336));
        assert!(matches!(images.resized_size(1, 1000), Err(Error::Input(_))));
    }
}
