//! The Qwen-VL families' image and video part of the processor (transformers'
//! `Qwen2VLImageProcessor`, shared by Qwen2.5-VL and Qwen3-VL, and their video processors):
//! `smart_resize` to a multiple of `patch x merge` pixels within a pixel budget, bicubic resize,
//! normalise, and cut into `temporal x patch x patch` patches in merge-block order (a still image
//! fills its temporal patch with copies of itself; a video's last frame pads its last one). In
//! the prompt, each `<|image_pad|>` the chat template writes becomes one per merged token, and
//! each `<|video_pad|>` one per merged token of the clip (Qwen2.5-VL) or, per temporal patch, a
//! `<t seconds>` timestamp and that patch's tokens between vision tags (Qwen3-VL).

use std::path::Path;

use serde::Deserialize;

use super::encoding::VideoTiming;
use super::image::{AlphaMode, Image, Normalization, NormalizationJson, resize};
use super::message::Media;
use super::video::Video;
use super::{ProcessOptions, Visual, image_processor_json, optional_json};
use crate::error::{Error, Result};
use crate::models::QwenVlVariant;
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
    /// The video placeholder (`<|video_pad|>`).
    pub video_token: String,
    /// Its id.
    pub video_token_id: u32,
    /// Fewest pixels a video is resized to (per frame in Qwen2.5-VL, per clip in Qwen3-VL).
    pub video_min_pixels: u64,
    /// Most pixels a video is resized to (per frame in Qwen2.5-VL, per clip in Qwen3-VL).
    pub video_max_pixels: u64,
    /// Which generation: Qwen3-VL budgets a video as a whole and timestamps its frames.
    pub variant: QwenVlVariant,
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
    #[serde(flatten)]
    normalization: NormalizationJson,
}

/// In transformers 5 the `size` keys are pixel counts, not edge lengths.
#[derive(Deserialize, Default)]
struct SizeJson {
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
}

impl QwenVlImages {
    /// Reads the image and video settings of a Qwen-VL checkpoint directory.
    pub fn from_dir(dir: &Path, checkpoint: &QwenVlCheckpoint, tokenizer: &super::Tokenizer) -> Result<Self> {
        let (path, json): (_, ImageProcessorJson) = image_processor_json(dir)?;
        // transformers falls back to the image processor's file when there is no video one.
        let video_path = dir.join("video_preprocessor_config.json");
        let video: Option<ImageProcessorJson> = optional_json(&video_path)?;
        let vision = &checkpoint.model.vision;
        let budget = |json: &ImageProcessorJson, default: (u64, u64)| {
            let size = json.size.as_ref();
            (
                json.min_pixels.or(size.and_then(|s| s.shortest_edge)).unwrap_or(default.0),
                json.max_pixels.or(size.and_then(|s| s.longest_edge)).unwrap_or(default.1),
            )
        };
        let (min_pixels, max_pixels) = budget(&json, (56 * 56, 28 * 28 * 1280));
        let (video_min_pixels, video_max_pixels) =
            video.as_ref().map_or((min_pixels, max_pixels), |video| budget(video, (min_pixels, max_pixels)));
        let images = Self {
            patch_size: json.patch_size.unwrap_or(vision.patch_size),
            merge_size: json.merge_size.unwrap_or(vision.spatial_merge_size),
            temporal_patch_size: json.temporal_patch_size.unwrap_or(vision.temporal_patch_size),
            // `min_pixels` / `max_pixels` override `size`, as in the processor's __init__.
            min_pixels,
            max_pixels,
            normalization: json.normalization.or(Normalization::OPENAI_CLIP),
            image_token: "<|image_pad|>".into(),
            image_token_id: checkpoint.model.image_token_id,
            video_token: "<|video_pad|>".into(),
            video_token_id: checkpoint.model.video_token_id,
            video_min_pixels,
            video_max_pixels,
            variant: checkpoint.model.variant,
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
        for (min, max) in [(images.min_pixels, images.max_pixels), (images.video_min_pixels, images.video_max_pixels)] {
            if min == 0 || min > max {
                return fail(format!("pixel budget {min}..={max} is empty"));
            }
        }
        images.normalization.validate().map_err(|message| Error::config(&path, message))?;
        for (token, id) in [(&images.image_token, images.image_token_id), (&images.video_token, images.video_token_id)]
        {
            tokenizer.check_token_id(token, id, &dir.join("config.json"))?;
        }
        Ok(images)
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

    /// How each image or video is cut up, from its size alone.
    pub(crate) fn plan(&self, media: &[Media], options: &ProcessOptions) -> Result<Vec<Visual>> {
        let (min, max) = self.budget(options)?;
        media
            .iter()
            .map(|item| match item {
                Media::Image(image) => {
                    let (height, width) =
                        smart_resize(image.height().into(), image.width().into(), self.factor() as u64, min, max)?;
                    Ok(self.visual(1, height, width, None))
                }
                Media::Video(video) => self.plan_video(video),
            })
            .collect()
    }

    /// A video's patches: each frame resized alike (Qwen2.5-VL: within the budget per frame;
    /// Qwen3-VL: the whole clip within it), frames grouped into temporal patches.
    fn plan_video(&self, video: &Video) -> Result<Visual> {
        let frames = video.frames().len();
        let (height, width, factor) = (u64::from(video.height()), u64::from(video.width()), self.factor() as u64);
        let tp = self.temporal_patch_size;
        let (h, w) = match self.variant {
            QwenVlVariant::Qwen2_5 => {
                smart_resize(height, width, factor, self.video_min_pixels, self.video_max_pixels)?
            }
            QwenVlVariant::Qwen3 => {
                smart_resize_clip(frames, height, width, tp, factor, self.video_min_pixels, self.video_max_pixels)?
            }
        };
        let timing = VideoTiming { frames, fps: video.fps(), seconds_per_patch: tp as f64 / video.fps() };
        Ok(self.visual(frames.div_ceil(tp), h, w, Some(timing)))
    }

    fn visual(&self, t: usize, height: u64, width: u64, video: Option<VideoTiming>) -> Visual {
        let p = self.patch_size as u64;
        let grid = VisualGrid { t, h: (height / p) as usize, w: (width / p) as usize };
        let tokens = grid.patches() / (self.merge_size * self.merge_size);
        Visual::Patches { grid, patch_values: self.patch_values(), tokens, video }
    }

    /// Values per flattened patch.
    fn patch_values(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The rendered prompt with each image placeholder repeated once per merged token, and each
    /// video placeholder expanded as the family does (Qwen3-VL: a timestamp and vision tags per
    /// temporal patch, inside the template's own tags).
    pub(crate) fn expand(&self, rendered: &str, visuals: &[Visual]) -> Result<String> {
        let (images, videos) = visuals.iter().fold((0, 0), |(i, v), visual| match visual {
            Visual::Patches { video: Some(_), .. } => (i, v + 1),
            _ => (i + 1, v),
        });
        let placeholders =
            (rendered.matches(self.image_token.as_str()).count(), rendered.matches(self.video_token.as_str()).count());
        if placeholders != (images, videos) {
            return Err(Error::ImageCount { images: images + videos, placeholders: placeholders.0 + placeholders.1 });
        }
        let mut text = String::with_capacity(rendered.len());
        let mut rest = rendered;
        for visual in visuals {
            let Visual::Patches { grid, tokens, video, .. } = *visual else {
                return Err(Error::Input("a Qwen-VL processor planned tiles".into()));
            };
            let placeholder = if video.is_some() { &self.video_token } else { &self.image_token };
            let at =
                rest.find(placeholder.as_str()).ok_or(Error::ImageCount { images: visuals.len(), placeholders: 0 })?;
            text.push_str(&rest[..at]);
            rest = &rest[at + placeholder.len()..];
            match (video, self.variant) {
                (Some(timing), QwenVlVariant::Qwen3) => {
                    let per_patch = tokens / grid.t.max(1);
                    for (stamp, _) in self.timestamps(timing).iter().zip(0..grid.t) {
                        text.push_str(&format!("<{stamp:.1} seconds><|vision_start|>"));
                        text.push_str(&self.video_token.repeat(per_patch));
                        text.push_str("<|vision_end|>");
                    }
                }
                _ => text.push_str(&placeholder.repeat(tokens)),
            }
        }
        text.push_str(rest);
        Ok(text)
    }

    /// Qwen3-VL's timestamp of each temporal patch: the mean time of its first and last frame
    /// (the last frame repeated to fill the final patch).
    fn timestamps(&self, timing: VideoTiming) -> Vec<f64> {
        let tp = self.temporal_patch_size;
        let padded = timing.frames.div_ceil(tp) * tp;
        let time = |i: usize| i.min(timing.frames - 1) as f64 / timing.fps;
        (0..padded).step_by(tp).map(|first| (time(first) + time(first + tp - 1)) / 2.0).collect()
    }

    /// The patches of every image and video, in prompt order: `[patches, 3 * temporal * patch^2]`.
    pub(crate) fn pixel_values(&self, media: &[Media], visuals: &[Visual]) -> Result<Vec<f32>> {
        let mut values = Vec::with_capacity(visuals.iter().map(Visual::values).sum());
        for (item, visual) in media.iter().zip(visuals) {
            let Visual::Patches { grid, .. } = *visual else {
                return Err(Error::Input("a Qwen-VL processor planned tiles".into()));
            };
            let (width, height) = ((grid.w * self.patch_size) as u32, (grid.h * self.patch_size) as u32);
            let frame = |image: &Image| {
                let rgb = image.rgb8(AlphaMode::CompositeOnWhite);
                self.normalization.planes(&resize(&rgb, width, height))
            };
            let frames: Vec<Vec<f32>> = match item {
                Media::Image(image) => vec![frame(image)],
                Media::Video(video) => video.frames().iter().map(frame).collect(),
            };
            let frames: Vec<&[f32]> = frames.iter().map(Vec::as_slice).collect();
            self.patchify(&frames, grid, &mut values);
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
                                    // A still image repeats; a video's last frame pads its last patch.
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

/// Qwen3-VL's video `smart_resize`: as [`smart_resize`], but the budget covers the whole clip
/// (`frames` rounded to whole temporal patches), and frames smaller than `factor` are first
/// scaled up to it.
pub fn smart_resize_clip(
    frames: usize,
    height: u64,
    width: u64,
    temporal_factor: usize,
    factor: u64,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u64, u64)> {
    if frames < temporal_factor {
        return Err(Error::Input(format!(
            "a video of {frames} frames is shorter than one temporal patch of {temporal_factor}"
        )));
    }
    if height == 0 || width == 0 || factor == 0 {
        return Err(Error::Input(format!("cannot resize {width}x{height} frames to multiples of {factor}")));
    }
    let (mut h, mut w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > MAX_ASPECT_RATIO {
        return Err(Error::Input(format!(
            "{width}x{height} frames are more than {MAX_ASPECT_RATIO} times as long as they are wide"
        )));
    }
    if h < f || w < f {
        let scale = (f / h).max(f / w);
        (h, w) = ((h * scale).trunc(), (w * scale).trunc());
    }
    let n = frames as f64;
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    let t_bar = (n / temporal_factor as f64).round_ties_even() * temporal_factor as f64;
    if t_bar * h_bar * w_bar > max_pixels as f64 {
        let beta = (n * h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if t_bar * h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (n * h * w)).sqrt();
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
            video_token: "<|video_pad|>".into(),
            video_token_id: 1,
            video_min_pixels: 1,
            video_max_pixels: 1 << 20,
            variant: QwenVlVariant::Qwen2_5,
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
