//! The Qwen-VL families' image part of the processor (transformers' `Qwen2VLImageProcessor`,
//! shared by Qwen2.5-VL and Qwen3-VL): `smart_resize` to a multiple of `patch x merge` pixels
//! within a pixel budget, bicubic resize, normalise, and cut into `temporal x patch x patch`
//! patches in merge-block order (a still image fills its temporal patch with copies of itself).
//! In the prompt, each `<|image_pad|>` the chat template writes becomes one per merged token.

use std::path::Path;

use serde::Deserialize;

use super::image::{AlphaMode, Image, Normalization, resize};
use super::{ProcessOptions, Visual, read_image_processor};
use crate::error::{Error, Result};
use crate::models::qwen_vl::QwenVlCheckpoint;
use crate::vision::qwen_grid::VisualGrid;

/// The largest aspect ratio `smart_resize` accepts.
const MAX_ASPECT_RATIO: f64 = 200.0;

/// How a Qwen-VL checkpoint turns images into patches and prompt text.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVlImages {
    /// Side of a patch in pixels.
    pub patch_size: usize,
    /// Patches per side of a merged token.
    pub merge_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Fewest pixels an image is resized to.
    pub min_pixels: u64,
    /// Most pixels an image is resized to.
    pub max_pixels: u64,
    /// Rescaling and normalisation of pixel values.
    pub normalization: Normalization,
    /// The image placeholder the chat template writes, as text (`<|image_pad|>`).
    pub image_token: String,
    /// Its id.
    pub image_token_id: u32,
}

/// `preprocessor_config.json` of `Qwen2VLImageProcessor`.
#[derive(Deserialize, Default)]
struct ImageProcessorJson {
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    size: Option<SizeJson>,
    patch_size: Option<usize>,
    merge_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    rescale_factor: Option<f32>,
}

/// In transformers 5 the `size` keys are pixel counts, not edge lengths.
#[derive(Deserialize, Default)]
struct SizeJson {
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
}

impl QwenVlImages {
    /// Reads the image settings of a Qwen-VL checkpoint directory.
    pub fn from_dir(dir: &Path, checkpoint: &QwenVlCheckpoint, tokenizer: &super::Tokenizer) -> Result<Self> {
        let (path, json): (_, ImageProcessorJson) = match read_image_processor(dir)? {
            Some((path, value)) => {
                let json =
                    serde_json::from_value(value).map_err(|source| Error::Json { path: path.clone(), source })?;
                (path, json)
            }
            None => (dir.join("preprocessor_config.json"), ImageProcessorJson::default()),
        };
        let vision = &checkpoint.model.vision;
        let size = json.size.unwrap_or_default();
        let images = Self {
            patch_size: json.patch_size.unwrap_or(vision.patch_size),
            merge_size: json.merge_size.unwrap_or(vision.spatial_merge_size),
            temporal_patch_size: json.temporal_patch_size.unwrap_or(vision.temporal_patch_size),
            // `min_pixels` / `max_pixels` override `size`, as in the processor's __init__.
            min_pixels: json.min_pixels.or(size.shortest_edge).unwrap_or(56 * 56),
            max_pixels: json.max_pixels.or(size.longest_edge).unwrap_or(28 * 28 * 1280),
            normalization: Normalization {
                rescale_factor: json.rescale_factor.unwrap_or(1.0 / 255.0),
                mean: json.image_mean.unwrap_or(Normalization::OPENAI_CLIP.mean),
                std: json.image_std.unwrap_or(Normalization::OPENAI_CLIP.std),
            },
            image_token: "<|image_pad|>".into(),
            image_token_id: checkpoint.model.image_token_id,
        };
        let fail = |message: String| Err(Error::config(&path, message));
        if (images.patch_size, images.merge_size, images.temporal_patch_size)
            != (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        {
            return fail(format!(
                "patches of {}x{} merged {}x{} over {} frames, but the vision tower takes {}x{} merged {}x{} over {}",
                images.patch_size,
                images.patch_size,
                images.merge_size,
                images.merge_size,
                images.temporal_patch_size,
                vision.patch_size,
                vision.patch_size,
                vision.spatial_merge_size,
                vision.spatial_merge_size,
                vision.temporal_patch_size
            ));
        }
        if images.min_pixels == 0 || images.min_pixels > images.max_pixels {
            return fail(format!("pixel budget {}..={} is empty", images.min_pixels, images.max_pixels));
        }
        images.normalization.validate().map_err(|message| Error::config(&path, message))?;
        match tokenizer.token_id(&images.image_token) {
            Some(id) if id == images.image_token_id => Ok(images),
            found => fail(format!(
                "image_token_id {} differs from the tokenizer's {} ({found:?})",
                images.image_token_id, images.image_token
            )),
        }
    }

    /// Pixels per side of a merged token: sizes are rounded to multiples of it.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// The pixel budget for one call.
    fn budget(&self, options: &ProcessOptions) -> Result<(u64, u64)> {
        let min = options.min_pixels.unwrap_or(self.min_pixels);
        let max = options.max_pixels.unwrap_or(self.max_pixels);
        if min == 0 || min > max {
            return Err(Error::Input(format!(
                "pixel limits must satisfy 1 <= min_pixels <= max_pixels, got {min}..={max}"
            )));
        }
        Ok((min, max))
    }

    /// How each image is cut up, from its size alone.
    pub(crate) fn plan(&self, images: &[&Image], options: &ProcessOptions) -> Result<Vec<Visual>> {
        let (min, max) = self.budget(options)?;
        let factor = self.factor() as u64;
        images
            .iter()
            .map(|image| {
                let (height, width) = smart_resize(image.height().into(), image.width().into(), factor, min, max)?;
                let grid = VisualGrid {
                    t: 1,
                    h: (height / self.patch_size as u64) as usize,
                    w: (width / self.patch_size as u64) as usize,
                };
                let tokens = grid.patches() / (self.merge_size * self.merge_size);
                Ok(Visual::Patches { grid, patch_values: self.patch_values(), tokens, video_seconds_per_patch: None })
            })
            .collect()
    }

    /// Values per flattened patch.
    fn patch_values(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The rendered prompt with each image placeholder repeated once per merged token.
    pub(crate) fn expand(&self, rendered: &str, visuals: &[Visual]) -> Result<String> {
        let pieces: Vec<&str> = rendered.split(self.image_token.as_str()).collect();
        if pieces.len() - 1 != visuals.len() {
            return Err(Error::ImageCount { images: visuals.len(), placeholders: pieces.len() - 1 });
        }
        let mut text = String::with_capacity(rendered.len());
        for (piece, visual) in pieces.iter().zip(visuals) {
            text.push_str(piece);
            text.push_str(&self.image_token.repeat(visual.tokens()));
        }
        text.push_str(pieces[visuals.len()]);
        Ok(text)
    }

    /// The patches of every image, in prompt order: `[patches, 3 * temporal * patch^2]`.
    pub(crate) fn pixel_values(&self, images: &[&Image], visuals: &[Visual]) -> Result<Vec<f32>> {
        let mut values = Vec::with_capacity(visuals.iter().map(Visual::values).sum());
        for (image, visual) in images.iter().zip(visuals) {
            let Visual::Patches { grid, .. } = *visual else {
                return Err(Error::Input("a Qwen-VL processor planned tiles".into()));
            };
            let (width, height) = ((grid.w * self.patch_size) as u32, (grid.h * self.patch_size) as u32);
            let rgb = image.rgb8(AlphaMode::CompositeOnWhite);
            let resized = resize(&rgb, width, height);
            let frame = self.normalization.planes(&resized);
            self.patchify(&[frame.as_slice()], grid, &mut values);
        }
        Ok(values)
    }

    /// Appends the patches of `frames` (channel-first planes of the grid's size, one per frame of
    /// each temporal patch; a still image is one frame, repeated): for each temporal patch, each
    /// merged block row-major, each patch of the block row-major, the values in `(channel, frame,
    /// row, column)` order.
    fn patchify(&self, frames: &[&[f32]], grid: VisualGrid, out: &mut Vec<f32>) {
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (height, width) = (grid.h * p, grid.w * p);
        let plane = height * width;
        for t in 0..grid.t {
            for bh in 0..grid.h / m {
                for bw in 0..grid.w / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                            for c in 0..3 {
                                for ti in 0..tp {
                                    let frame = frames[(t * tp + ti).min(frames.len() - 1)];
                                    for py in 0..p {
                                        let row = c * plane + (y0 + py) * width + x0;
                                        out.extend_from_slice(&frame[row..row + p]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// transformers' `smart_resize`: the `(height, width)` nearest to the image's, each a multiple of
/// `factor`, with `min_pixels <= height * width <= max_pixels` (aspect kept as well as rounding
/// allows). Rounds halves to even, as Python's `round`.
pub fn smart_resize(height: u64, width: u64, factor: u64, min_pixels: u64, max_pixels: u64) -> Result<(u64, u64)> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(Error::Input(format!("cannot resize a {width}x{height} image to multiples of {factor}")));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > MAX_ASPECT_RATIO {
        return Err(Error::Input(format!(
            "a {width}x{height} image is more than {MAX_ASPECT_RATIO} times as long as it is wide"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as u64, w_bar as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_transformers_examples() {
        let qwen2_5 = |h, w| smart_resize(h, w, 28, 3136, 12_845_056).unwrap();
        assert_eq!(qwen2_5(42, 42), (56, 56)); // 1.5 rounds to 2
        assert_eq!(qwen2_5(70, 70), (56, 56)); // 2.5 rounds to 2 (half to even)
        assert_eq!(qwen2_5(98, 126), (112, 112));
        assert_eq!(qwen2_5(480, 640), (476, 644));
        assert_eq!(qwen2_5(10, 2000), (28, 812));
        let qwen3 = |h, w| smart_resize(h, w, 32, 65_536, 16_777_216).unwrap();
        assert_eq!(qwen3(720, 1280), (704, 1280));
        assert_eq!(qwen3(480, 640), (480, 640));
        assert_eq!(qwen3(100, 100), (256, 256));
        assert!(smart_resize(1, 300, 28, 3136, 12_845_056).is_err());
    }

    #[test]
    fn patches_follow_merge_blocks_with_the_frame_repeated() {
        let images = QwenVlImages {
            patch_size: 2,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 1,
            max_pixels: 1 << 20,
            normalization: Normalization::OPENAI_CLIP,
            image_token: "<|image_pad|>".into(),
            image_token_id: 0,
        };
        // 3 planes of 4x4: value = channel * 100 + y * 10 + x.
        let plane: Vec<f32> =
            (0..3).flat_map(|c| (0..4).flat_map(move |y| (0..4).map(move |x| (c * 100 + y * 10 + x) as f32))).collect();
        let mut out = Vec::new();
        images.patchify(&[plane.as_slice()], VisualGrid { t: 1, h: 2, w: 2 }, &mut out);
        assert_eq!(out.len(), 4 * 3 * 2 * 2 * 2);
        // Patch 1 of the block is at (row 0, column 1): x 2..4, y 0..2; channel 0, both frames.
        let patch1 = &out[24..48];
        assert_eq!(patch1[..8], [2.0, 3.0, 12.0, 13.0, 2.0, 3.0, 12.0, 13.0]);
        assert_eq!(patch1[8..12], [102.0, 103.0, 112.0, 113.0]);
    }
}
