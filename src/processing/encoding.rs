//! A processed conversation: token ids, and pixel values laid out as the family's vision tower
//! takes them.

use burn::tensor::{Device, Tensor, TensorData};

use super::tiling::Grid;
use crate::models::{ModelInputs, PatchGrid, Pixels};
use crate::vision::qwen_grid::VisualGrid;

/// How one image of a prompt was cut up for the vision tower.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Visual {
    /// InternVL: `tiles` square tiles of `size` pixels (a grid, then a thumbnail if any).
    Tiles {
        /// The grid chosen for the image.
        grid: Grid,
        /// Tiles it contributes, thumbnail included.
        tiles: usize,
        /// Side of a tile in pixels.
        size: usize,
        /// Image tokens it fills in the prompt.
        tokens: usize,
    },
    /// Qwen-VL: `t x h x w` patches (`t` temporal patches of a video; 1 for an image).
    Patches {
        /// The patch grid.
        grid: VisualGrid,
        /// Values per flattened patch (`3 x temporal x patch x patch`).
        patch_values: usize,
        /// Image (or video) tokens it fills in the prompt.
        tokens: usize,
        /// For a video, its frames and their rate.
        video: Option<VideoTiming>,
    },
    /// Pixtral: the image resized to `height x width` pixels (multiples of the patch), whole.
    Image {
        /// Height in pixels.
        height: usize,
        /// Width in pixels.
        width: usize,
        /// Image tokens it fills in the prompt (one per patch).
        tokens: usize,
    },
}

/// The timing of a video's frames.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoTiming {
    /// Frames given (before padding to whole temporal patches).
    pub frames: usize,
    /// Frames per second.
    pub fps: f64,
    /// Seconds one temporal patch spans (`temporal_patch_size / fps`).
    pub seconds_per_patch: f64,
}

impl Visual {
    /// How many pixel values it holds.
    pub fn values(&self) -> usize {
        match *self {
            Visual::Tiles { tiles, size, .. } => tiles * 3 * size * size,
            Visual::Patches { grid, patch_values, .. } => grid.patches() * patch_values,
            Visual::Image { height, width, .. } => 3 * height * width,
        }
    }

    /// Image tokens it fills in the prompt.
    pub fn tokens(&self) -> usize {
        match *self {
            Visual::Tiles { tokens, .. } | Visual::Patches { tokens, .. } | Visual::Image { tokens, .. } => tokens,
        }
    }
}

/// A processed conversation.
#[derive(Debug, Clone)]
pub struct Encoding {
    /// Token ids, image tokens included.
    pub input_ids: Vec<u32>,
    /// The pixel values of every image, in prompt order, as [`visuals`](Self::visuals) lays
    /// them out (InternVL, LLaVA: `[tiles, 3, size, size]`; Qwen-VL: `[patches, 3 x temporal x
    /// patch^2]`; Pixtral: `[3, height, width]` per image; normalised).
    pub pixel_values: Vec<f32>,
    /// How each image was cut up, in prompt order.
    pub visuals: Vec<Visual>,
    /// The rendered chat template, before image placeholders were expanded.
    pub prompt: String,
}

impl Encoding {
    /// Image tokens of all images together: what the vision tower produces for this prompt.
    pub fn image_tokens(&self) -> usize {
        self.visuals.iter().map(Visual::tokens).sum()
    }

    /// The pixel values as the model takes them, `None` without images.
    pub fn pixels(&self, device: &Device) -> Option<Pixels> {
        let first = self.visuals.first()?;
        match *first {
            Visual::Tiles { size, .. } => {
                let tiles = self.visuals.iter().map(|visual| visual.values()).sum::<usize>() / (3 * size * size);
                let data = TensorData::new(self.pixel_values.clone(), [tiles, 3, size, size]);
                Some(Pixels::Tiles(Tensor::from_data(data, device)))
            }
            Visual::Patches { patch_values, .. } => {
                let patches = self.pixel_values.len() / patch_values;
                let data = TensorData::new(self.pixel_values.clone(), [patches, patch_values]);
                let visuals = self
                    .visuals
                    .iter()
                    .filter_map(|visual| match *visual {
                        Visual::Patches { grid, video, .. } => {
                            Some(PatchGrid { grid, video_seconds_per_patch: video.map(|v| v.seconds_per_patch) })
                        }
                        Visual::Tiles { .. } | Visual::Image { .. } => None,
                    })
                    .collect();
                Some(Pixels::Patches { values: Tensor::from_data(data, device), visuals })
            }
            Visual::Image { .. } => {
                let mut start = 0;
                let mut images = Vec::with_capacity(self.visuals.len());
                for visual in &self.visuals {
                    let Visual::Image { height, width, .. } = *visual else { return None };
                    let values = self.pixel_values[start..start + visual.values()].to_vec();
                    start += visual.values();
                    images.push(Tensor::from_data(TensorData::new(values, [3, height, width]), device));
                }
                Some(Pixels::Images(images))
            }
        }
    }

    /// Inputs for one sequence.
    pub fn to_model_inputs(&self, device: &Device) -> ModelInputs {
        ModelInputs { input_ids: vec![self.input_ids.clone()], pixels: self.pixels(device) }
    }
}
