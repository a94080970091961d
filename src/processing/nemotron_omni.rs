//! Nemotron 3 Nano Omni's image part of the processor (transformers'
//! `NemotronH_Omni_Reasoning_V3Processor` and its image processor): each image is stretched as a
//! whole to its own patch grid, chosen from its size and a patch budget (no tiles, no thumbnail),
//! with an antialiased bicubic filter on floating-point levels, then normalised and cut into
//! row-major patches. In the prompt, each `<image>` the chat template writes becomes
//! `<img>` + one `<image>` per 2x2 block of patches + `</img>`.

use std::path::Path;

use serde::Deserialize;

use super::image::{AlphaMode, Image, Normalization, NormalizationJson, resize_levels};
use super::prompt::expand_each;
use super::{Media, ProcessOptions, Tokenizer, Visual, image_processor_json};
use crate::error::{Error, Result};
use crate::models::nemotron_omni::{MERGE, NemotronOmniCheckpoint};
use crate::vision::qwen_grid::VisualGrid;

/// The audio placeholders of the Omni chat template and processor.
const AUDIO_TOKENS: &[&str] = &["<so_embedding>", "<so_start>", "<so_end>"];

/// How a Nemotron Omni checkpoint turns images into pixels and prompt text.
#[derive(Debug, Clone, PartialEq)]
pub struct NemotronOmniImages {
    /// Side of a patch in pixels.
    pub patch_size: usize,
    /// Fewest patches an image is resized to (small images are scaled up).
    pub min_num_patches: usize,
    /// Most patches an image is resized to (`None`: the context alone bounds it).
    pub max_num_patches: Option<usize>,
    /// The context the budget is derived from (`max_model_len`).
    pub max_model_len: usize,
    /// Rescaling and normalisation of pixel values.
    pub normalization: Normalization,
    /// The image token (`<image>`), as text: the chat template's placeholder and the token image
    /// features replace.
    pub image_token: String,
    /// Its id.
    pub image_token_id: u32,
    /// The token opening an image (`<img>`).
    pub image_start_token: String,
    /// The token closing it (`</img>`).
    pub image_end_token: String,
}

/// The image processor's settings (`preprocessor_config.json`, or `image_processor` in
/// `processor_config.json`); 5.x and remote-code spellings.
#[derive(Deserialize, Default)]
struct ImageProcessorJson {
    patch_size: Option<usize>,
    min_num_patches: Option<usize>,
    max_num_patches: Option<usize>,
    max_model_len: Option<usize>,
    downsample_ratio: Option<f64>,
    norm_mean: Option<[f32; 3]>,
    norm_std: Option<[f32; 3]>,
    #[serde(flatten)]
    normalization: NormalizationJson,
}

impl NemotronOmniImages {
    /// Reads the image settings of a Nemotron Omni checkpoint directory.
    pub fn from_dir(dir: &Path, checkpoint: &NemotronOmniCheckpoint, tokenizer: &Tokenizer) -> Result<Self> {
        let (path, json): (_, ImageProcessorJson) = image_processor_json(dir)?;
        let fail = |message: String| Err(Error::config(&path, message));
        if let Some(ratio) = json.downsample_ratio.filter(|&ratio| ratio != 0.5) {
            return fail(format!("downsample_ratio {ratio} is not supported (only 0.5)"));
        }
        let mut normalization = json.normalization.or(Normalization::OPENAI_CLIP);
        normalization.mean = json.norm_mean.unwrap_or(normalization.mean);
        normalization.std = json.norm_std.unwrap_or(normalization.std);
        let vision = &checkpoint.model.vision;
        let images = Self {
            patch_size: json.patch_size.unwrap_or(vision.patch_size),
            min_num_patches: json.min_num_patches.unwrap_or(1024),
            max_num_patches: json.max_num_patches.or(Some(13_312)).filter(|&max| max > 0),
            max_model_len: json.max_model_len.unwrap_or(16_384),
            normalization,
            image_token: "<image>".into(),
            image_token_id: checkpoint.model.image_token_id,
            image_start_token: "<img>".into(),
            image_end_token: "</img>".into(),
        };
        if images.patch_size != vision.patch_size {
            return fail(format!(
                "patches of {} pixels, but the vision tower takes {}",
                images.patch_size, vision.patch_size
            ));
        }
        if images.min_num_patches > crate::config::MAX_DIMENSION || images.max_model_len > crate::config::MAX_CONTEXT {
            return fail("min_num_patches or max_model_len is beyond any model".into());
        }
        images.normalization.validate().map_err(|message| Error::config(&path, message))?;
        tokenizer.check_token_id(&images.image_token, images.image_token_id, &dir.join("config.json"))?;
        for token in [&images.image_start_token, &images.image_end_token] {
            if tokenizer.token_id(token).is_none() {
                return Err(Error::config(dir.join("tokenizer.json"), format!("the tokenizer has no {token} token")));
            }
        }
        Ok(images)
    }

    /// Patches each image of a call of `images` may take: the context's worth of image tokens (at
    /// least the minimum for every image), within the maximum, never below the minimum. A
    /// per-call `max_pixels` lowers it (and `min_pixels` sets the minimum).
    pub fn budget(&self, images: usize, options: &ProcessOptions) -> usize {
        let area = self.patch_size * self.patch_size;
        let min = self.min_patches(options);
        let merge = MERGE * MERGE;
        let mut budget = self.max_model_len.saturating_sub(4).saturating_mul(merge).max(min.saturating_mul(images));
        if let Some(max) = self.max_num_patches {
            budget = budget.min(max);
        }
        budget = budget.max(min);
        if let Some(pixels) = options.max_pixels {
            budget = budget.min(((pixels as usize) / area).max(merge));
        }
        budget
    }

    /// Fewest patches an image is resized to: the checkpoint's, or a per-call `min_pixels`.
    fn min_patches(&self, options: &ProcessOptions) -> usize {
        options
            .min_pixels
            .map_or(self.min_num_patches, |pixels| (pixels as usize) / (self.patch_size * self.patch_size))
    }

    /// transformers' `get_patch_grid_size`: the `(rows, cols)` of patches an image of
    /// `height x width` pixels is stretched to within `budget` patches (`min` the fewest), both
    /// even.
    pub fn grid(&self, height: usize, width: usize, budget: usize, min: usize) -> Result<(usize, usize)> {
        let p = self.patch_size as f64;
        // Python's round is half-to-even: round(x + 0.5) is floor(x) + 1, or x for even whole x.
        let mut gh = (height as f64 / p + 0.5).round_ties_even();
        let mut gw = (width as f64 / p + 0.5).round_ties_even();
        let shrink = (budget as f64 / (gh * gw)).sqrt().min(1.0);
        gh = (shrink * gh).floor();
        gw = (shrink * gw).floor();
        if gh < 1.0 || gw < 1.0 {
            return Err(Error::Input(format!(
                "a {width}x{height} image is too elongated: one side shrinks to nothing within {budget} patches"
            )));
        }
        if budget > min && gh * gw < min as f64 {
            let grow = (min as f64 / (gh * gw)).sqrt();
            gh = (grow * gh).ceil();
            gw = (grow * gw).ceil();
        }
        let (mut gh, mut gw) = (gh as usize, gw as usize);
        let m = MERGE;
        if !gh.is_multiple_of(m) {
            let up = gh + m - gh % m;
            gh = if up * gw <= budget { up } else { m.max(gh - gh % m) };
        }
        if !gw.is_multiple_of(m) {
            let up = gw + m - gw % m;
            gw = if gh * up <= budget { up } else { m.max(gw - gw % m) };
        }
        Ok((gh, gw))
    }

    /// Each image's patch grid, from its size alone.
    pub(crate) fn plan(&self, media: &[Media], options: &ProcessOptions) -> Result<Vec<Visual>> {
        let budget = self.budget(media.len(), options);
        let min = self.min_patches(options);
        let area = self.patch_size * self.patch_size;
        media
            .iter()
            .map(|item| {
                let Media::Image(image) = item else {
                    return Err(Error::Input("Nemotron Omni checkpoints take images here, not videos".into()));
                };
                let (h, w) = self.grid(image.height() as usize, image.width() as usize, budget, min)?;
                Ok(Visual::Patches {
                    grid: VisualGrid { t: 1, h, w },
                    patch_values: 3 * area,
                    tokens: h * w / (MERGE * MERGE),
                    video: None,
                })
            })
            .collect()
    }

    /// The rendered prompt with each `<image>` expanded to `<img>`, the image's tokens, `</img>`.
    /// Audio placeholders are refused: the audio tower is not loaded, and the model would read them
    /// as text.
    pub(crate) fn expand(&self, rendered: &str, visuals: &[Visual]) -> Result<String> {
        if let Some(token) = AUDIO_TOKENS.iter().find(|token| rendered.contains(**token)) {
            return Err(Error::Input(format!(
                "the prompt asks for audio ({token}): Nemotron Omni runs images only here"
            )));
        }
        expand_each(rendered, &self.image_token, visuals, |visual| {
            Ok(format!(
                "{}{}{}",
                self.image_start_token,
                self.image_token.repeat(visual.tokens()),
                self.image_end_token
            ))
        })
    }

    /// The normalised patches of every image, `[rows * cols, 3 * patch^2]` each (row-major
    /// patches, each `(channel, y, x)`), in prompt order.
    pub(crate) fn pixel_values(&self, images: &[&Image], visuals: &[Visual]) -> Result<Vec<f32>> {
        let p = self.patch_size;
        let mut values = Vec::with_capacity(visuals.iter().map(Visual::values).sum());
        for (image, visual) in images.iter().zip(visuals) {
            let Visual::Patches { grid, .. } = *visual else {
                return Err(Error::Input("a Nemotron Omni processor planned no patch grid".into()));
            };
            let (height, width) = (grid.h * p, grid.w * p);
            let rgb = image.rgb8(AlphaMode::CompositeOnWhite);
            let levels = resize_levels(&rgb, width as u32, height as u32);
            // transformers' fused normalisation: (level - mean / rescale) / (std / rescale), the
            // factor 1 / rescale (255) taken in double precision, the products in f32.
            let n = &self.normalization;
            let levels_per_unit = (1.0 / f64::from(n.rescale_factor)) as f32;
            let offset: [f32; 3] = std::array::from_fn(|c| n.mean[c] * levels_per_unit);
            let scale: [f32; 3] = std::array::from_fn(|c| n.std[c] * levels_per_unit);
            for row in 0..grid.h {
                for col in 0..grid.w {
                    for (c, (offset, scale)) in offset.iter().zip(&scale).enumerate() {
                        for y in row * p..(row + 1) * p {
                            let start = (y * width + col * p) * 3 + c;
                            values.extend((0..p).map(|x| (levels[start + 3 * x] - offset) / scale));
                        }
                    }
                }
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(min: usize, max: usize) -> NemotronOmniImages {
        NemotronOmniImages {
            patch_size: 16,
            min_num_patches: min,
            max_num_patches: Some(max),
            max_model_len: 16_384,
            normalization: Normalization::OPENAI_CLIP,
            image_token: "<image>".into(),
            image_token_id: 18,
            image_start_token: "<img>".into(),
            image_end_token: "</img>".into(),
        }
    }

    #[test]
    fn grids_of_the_published_settings_match_transformers() {
        // (width, height) -> (rows, cols), from transformers 5.24's get_patch_grid_size.
        let real = images(1024, 13_312);
        let budget = real.budget(1, &ProcessOptions::default());
        assert_eq!(budget, 13_312);
        for ((width, height), grid) in [
            ((640, 480), (30, 40)),
            ((1024, 768), (48, 64)),
            ((1920, 1080), (68, 120)),
            ((2048, 2048), (114, 116)),
            ((100, 100), (32, 32)),
            ((5000, 100), (8, 314)),
        ] {
            assert_eq!(real.grid(height, width, budget, 1024).unwrap(), grid, "{width}x{height}");
        }
        // A side that floors to nothing is an error (a division by zero in transformers).
        assert!(matches!(images(8, 48).grid(10, 1000, 48, 8), Err(Error::Input(_))));
    }

    #[test]
    fn each_image_is_wrapped_in_its_tags() {
        let visual = |h, w| Visual::Patches {
            grid: VisualGrid { t: 1, h, w },
            patch_values: 768,
            tokens: h * w / 4,
            video: None,
        };
        let text = images(8, 48).expand("a<image>b<image>c", &[visual(2, 4), visual(2, 2)]).unwrap();
        assert_eq!(text, "a<img><image><image></img>b<img><image></img>c");
        assert!(matches!(
            images(8, 48).expand("<image>", &[visual(2, 2), visual(2, 2)]),
            Err(Error::ImageCount { images: 2, placeholders: 1 })
        ));
    }
}
