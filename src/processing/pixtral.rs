//! Pixtral's image part of the processor (transformers' `PixtralProcessor` and
//! `PixtralImageProcessor`): each image is scaled down to fit `longest_edge` (never up), each side
//! rounded up to a whole number of patches, and stretched to that size with an antialiased
//! bicubic filter, then normalised. In the prompt, each `[IMG]` the chat template writes becomes
//! one `[IMG]` per patch, row by row, each row closed by `[IMG_BREAK]` and the last by
//! `[IMG_END]`; only the `[IMG]` tokens receive image features.

use std::path::Path;

use serde::Deserialize;

use super::image::{AlphaMode, Image, Normalization, NormalizationJson, resize};
use super::prompt::expand_each;
use super::{Tokenizer, Visual, image_processor_json, optional_json};
use crate::error::{Error, Result};
use crate::models::llava::{LlavaCheckpoint, LlavaVisionConfig};

/// How a Pixtral checkpoint turns images into pixels and prompt text.
#[derive(Debug, Clone, PartialEq)]
pub struct PixtralImages {
    /// The longest side an image keeps, in pixels.
    pub longest_edge: usize,
    /// Side of a patch in pixels.
    pub patch_size: usize,
    /// Rescaling and normalisation of pixel values.
    pub normalization: Normalization,
    /// The image token (`[IMG]`), as text.
    pub image_token: String,
    /// Its id.
    pub image_token_id: u32,
    /// The token closing each row of patches (`[IMG_BREAK]`).
    pub image_break_token: String,
    /// The token closing the image (`[IMG_END]`).
    pub image_end_token: String,
}

/// `preprocessor_config.json` of `PixtralImageProcessor`.
#[derive(Deserialize, Default)]
struct ImageProcessorJson {
    size: Option<LongestEdgeJson>,
    patch_size: Option<PatchSizeJson>,
    #[serde(flatten)]
    normalization: NormalizationJson,
}

#[derive(Deserialize)]
struct LongestEdgeJson {
    longest_edge: Option<usize>,
}

/// A patch side as an int or as `{"height", "width"}`.
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
pub(crate) enum PatchSizeJson {
    Square(usize),
    HeightWidth { height: usize, width: usize },
}

impl PatchSizeJson {
    pub(crate) fn square(self, path: &Path) -> Result<usize> {
        match self {
            PatchSizeJson::Square(side) => Ok(side),
            PatchSizeJson::HeightWidth { height, width } if height == width => Ok(height),
            PatchSizeJson::HeightWidth { height, width } => {
                Err(Error::config(path, format!("patch size {height}x{width} is not square")))
            }
        }
    }
}

/// `processor_config.json` of `PixtralProcessor`.
#[derive(Deserialize, Default)]
struct ProcessorJson {
    image_token: Option<String>,
    image_break_token: Option<String>,
    image_end_token: Option<String>,
    patch_size: Option<PatchSizeJson>,
    spatial_merge_size: Option<usize>,
}

impl PixtralImages {
    /// Reads the image settings of a Pixtral checkpoint directory.
    pub fn from_dir(dir: &Path, checkpoint: &LlavaCheckpoint, tokenizer: &Tokenizer) -> Result<Self> {
        let LlavaVisionConfig::Pixtral(vision) = &checkpoint.model.vision else {
            return Err(Error::config(dir.join("config.json"), "not a Pixtral vision tower"));
        };
        let (path, json): (_, ImageProcessorJson) = image_processor_json(dir)?;
        let processor_path = dir.join("processor_config.json");
        let processor: ProcessorJson = optional_json(&processor_path)?;
        let fail = |path: &Path, message: String| Err(Error::config(path, message));
        if let Some(merge) = processor.spatial_merge_size.filter(|&merge| merge != 1) {
            return fail(&processor_path, format!("spatial_merge_size {merge} is not supported (Pixtral's is 1)"));
        }
        let patch_size = match json.patch_size.or(processor.patch_size) {
            Some(patch) => patch.square(&path)?,
            None => vision.patch_size,
        };
        let images = Self {
            longest_edge: json.size.and_then(|size| size.longest_edge).unwrap_or(1024),
            patch_size,
            normalization: json.normalization.or(Normalization::OPENAI_CLIP),
            image_token: processor.image_token.unwrap_or_else(|| "[IMG]".into()),
            image_token_id: checkpoint.model.image_token_id,
            image_break_token: processor.image_break_token.unwrap_or_else(|| "[IMG_BREAK]".into()),
            image_end_token: processor.image_end_token.unwrap_or_else(|| "[IMG_END]".into()),
        };
        if images.patch_size != vision.patch_size {
            return fail(
                &path,
                format!("patches of {} pixels, but the vision tower takes {}", images.patch_size, vision.patch_size),
            );
        }
        if images.longest_edge < images.patch_size {
            return fail(&path, format!("longest_edge {} is below one patch", images.longest_edge));
        }
        images.normalization.validate().map_err(|message| Error::config(&path, message))?;
        tokenizer.check_token_id(&images.image_token, images.image_token_id, &dir.join("config.json"))?;
        for token in [&images.image_break_token, &images.image_end_token] {
            if tokenizer.token_id(token).is_none() {
                return fail(&processor_path, format!("the tokenizer has no {token} token"));
            }
        }
        Ok(images)
    }

    /// transformers' `get_resize_output_image_size`: `(height, width)` scaled down (floor) to fit
    /// `longest_edge`, each then rounded up to a multiple of the patch.
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let (mut h, mut w) = (height, width);
        let ratio = (height as f64 / self.longest_edge as f64).max(width as f64 / self.longest_edge as f64);
        if ratio > 1.0 {
            (h, w) = ((height as f64 / ratio).floor() as usize, (width as f64 / ratio).floor() as usize);
        }
        if h == 0 || w == 0 {
            return Err(Error::Input(format!(
                "a {width}x{height} image is too elongated: it shrinks to nothing within {} pixels",
                self.longest_edge
            )));
        }
        let p = self.patch_size;
        Ok((h.div_ceil(p) * p, w.div_ceil(p) * p))
    }

    /// Each image's resized size, from its size alone.
    pub(crate) fn plan(&self, images: &[&Image]) -> Result<Vec<Visual>> {
        images
            .iter()
            .map(|image| {
                let (height, width) = self.resized_size(image.height() as usize, image.width() as usize)?;
                Ok(Visual::Image { height, width, tokens: (height / self.patch_size) * (width / self.patch_size) })
            })
            .collect()
    }

    /// The rendered prompt with each `[IMG]` expanded to the image's rows of patches.
    pub(crate) fn expand(&self, rendered: &str, visuals: &[Visual]) -> Result<String> {
        expand_each(rendered, &self.image_token, visuals, |visual| {
            let Visual::Image { height, width, .. } = *visual else {
                return Err(Error::Input("a Pixtral processor planned tiles".into()));
            };
            let (rows, cols) = (height / self.patch_size, width / self.patch_size);
            let mut text = String::new();
            for row in 0..rows {
                text.push_str(&self.image_token.repeat(cols));
                text.push_str(if row + 1 == rows { &self.image_end_token } else { &self.image_break_token });
            }
            Ok(text)
        })
    }

    /// The normalised pixels of every image, `[3, height, width]` each, in prompt order.
    pub(crate) fn pixel_values(&self, images: &[&Image], visuals: &[Visual]) -> Result<Vec<f32>> {
        let mut values = Vec::with_capacity(visuals.iter().map(Visual::values).sum());
        for (image, visual) in images.iter().zip(visuals) {
            let Visual::Image { height, width, .. } = *visual else {
                return Err(Error::Input("a Pixtral processor planned tiles".into()));
            };
            let rgb = image.rgb8(AlphaMode::CompositeOnWhite);
            self.normalization.extend_chw(&resize(&rgb, width as u32, height as u32), &mut values);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(longest_edge: usize) -> PixtralImages {
        PixtralImages {
            longest_edge,
            patch_size: 16,
            normalization: Normalization::OPENAI_CLIP,
            image_token: "[IMG]".into(),
            image_token_id: 10,
            image_break_token: "[IMG_BREAK]".into(),
            image_end_token: "[IMG_END]".into(),
        }
    }

    #[test]
    fn resized_sizes_match_transformers() {
        // (height, width) -> (height, width), from transformers' get_resize_output_image_size.
        for (longest, input, output) in [
            (1024, (876, 1300), (704, 1024)),
            (1024, (500, 316), (512, 320)),
            (1024, (1025, 1025), (1024, 1024)),
            (1024, (2000, 3000), (688, 1024)),
            (1024, (1080, 1920), (576, 1024)),
            (1024, (10, 5000), (16, 1024)),
            (128, (101, 200), (64, 128)),
            (128, (1, 1), (16, 16)),
            (128, (17, 17), (32, 32)),
            (128, (64, 65), (64, 80)),
        ] {
            assert_eq!(images(longest).resized_size(input.0, input.1).unwrap(), output, "{input:?} at {longest}");
        }
        // transformers produces a zero-width image here; this is an error instead.
        assert!(matches!(images(128).resized_size(1000, 1), Err(Error::Input(_))));
    }

    #[test]
    fn each_row_of_patches_ends_with_a_break_and_the_image_with_an_end() {
        let visuals =
            [Visual::Image { height: 32, width: 48, tokens: 6 }, Visual::Image { height: 16, width: 16, tokens: 1 }];
        let text = images(128).expand("a[IMG]b[IMG]c", &visuals).unwrap();
        assert_eq!(text, "a[IMG][IMG][IMG][IMG_BREAK][IMG][IMG][IMG][IMG_END]b[IMG][IMG_END]c");
        assert!(matches!(images(128).expand("[IMG]", &visuals), Err(Error::ImageCount { images: 2, placeholders: 1 })));
    }
}
