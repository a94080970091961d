//! The InternVL family's image part of the processor: dynamic tiling with a thumbnail, resize and
//! normalise per tile, and the three ways its checkpoints write images into prompts
//! (transformers' `InternVLProcessor`, OpenGVLab's `model.chat`, NVLM-D's tile tags).

use std::path::Path;

use serde::Deserialize;

use super::image::{AlphaMode, Image, Normalization, NormalizationJson};
use super::prompt::ImagePlaceholders;
use super::tiling::{self, TilingConfig};
use super::tokenizer::Tokenizer;
use super::{ProcessOptions, Visual, image_processor_json};
use crate::error::{Error, Result};
use crate::models::InternVlVariant;
use crate::models::internvl::{CheckpointLayout, InternVlCheckpoint, TilingDefaults};

/// How an InternVL-family checkpoint turns images into tiles and prompt text.
#[derive(Debug, Clone, PartialEq)]
pub struct InternVlImages {
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
}

impl InternVlImages {
    /// Reads the image settings of an InternVL-family checkpoint directory.
    pub fn from_dir(dir: &Path, checkpoint: &InternVlCheckpoint, tokenizer: &Tokenizer) -> Result<Self> {
        let model = &checkpoint.model;
        let (_, json): (_, ImageProcessorJson) = image_processor_json(dir)?;
        let vision_size = model.vision.image_size as u32;
        let normalization = json.normalization.or(Normalization::IMAGENET);
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
                let defaults = checkpoint.tiling.unwrap_or(TilingDefaults {
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
        if let Err(message) = normalization.validate() {
            return fail(message);
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
        Ok(Self {
            placeholders,
            tiling,
            normalization,
            alpha,
            tokens_per_tile: model.tokens_per_tile(),
            image_token_id,
        })
    }

    /// The tiling for one call: the checkpoint's, with the call's limits.
    fn tiling(&self, options: &ProcessOptions) -> Result<TilingConfig> {
        let mut tiling = self.tiling;
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

    /// How each image is cut up, from its size alone.
    pub(crate) fn plan(&self, images: &[&Image], options: &ProcessOptions) -> Result<Vec<Visual>> {
        let tiling = self.tiling(options)?;
        let size = tiling.tile_size as usize;
        Ok(images
            .iter()
            .map(|image| {
                let (grid, tiles) = tiling::tile_layout(image.width(), image.height(), &tiling);
                Visual::Tiles { grid, tiles, size, tokens: tiles.saturating_mul(self.tokens_per_tile) }
            })
            .collect())
    }

    /// The rendered prompt with each image's placeholder expanded to its tokens' text.
    pub(crate) fn expand(&self, rendered: &str, visuals: &[Visual]) -> Result<String> {
        let tiles = visuals
            .iter()
            .map(|visual| match visual {
                Visual::Tiles { tiles, .. } => Ok(*tiles),
                _ => Err(Error::Input("an InternVL processor planned patches".into())),
            })
            .collect::<Result<Vec<usize>>>()?;
        self.placeholders.expand(rendered, &tiles, self.tokens_per_tile)
    }

    /// The normalised tiles of every image, `[tiles, 3, size, size]` in prompt order.
    pub(crate) fn pixel_values(
        &self,
        images: &[&Image],
        visuals: &[Visual],
        options: &ProcessOptions,
    ) -> Result<Vec<f32>> {
        let tiling = self.tiling(options)?;
        let mut pixel_values = Vec::with_capacity(visuals.iter().map(Visual::values).sum());
        for image in images {
            let rgb = image.rgb8(self.alpha);
            let (_, tiles) = tiling::split_into_tiles(&rgb, &tiling);
            for tile in &tiles {
                self.normalization.extend_chw(tile, &mut pixel_values);
            }
        }
        Ok(pixel_values)
    }
}

/// `preprocessor_config.json` (or the `image_processor` of `processor_config.json`) of
/// transformers' GotOcr2ImageProcessor, and the normalisation fields of OpenGVLab's CLIP one.
#[derive(Deserialize, Default)]
struct ImageProcessorJson {
    size: Option<SizeJson>,
    min_patches: Option<usize>,
    max_patches: Option<usize>,
    #[serde(flatten)]
    normalization: NormalizationJson,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeJson {
    Square(u32),
    HeightWidth { height: u32, width: u32 },
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
