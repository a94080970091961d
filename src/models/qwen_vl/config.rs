//! The Qwen-VL families' `config.json`: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`; hub
//! files keep the decoder's fields at the top level, transformers 5 nests them in `text_config`)
//! and Qwen3-VL (`Qwen3VLForConditionalGeneration`, always nested). Missing fields take the
//! defaults of transformers 5's config classes (which differ from the published checkpoints:
//! read every value from the file).

use std::path::Path;

use serde::Deserialize;

use super::{QwenVlConfig, QwenVlVariant};
use crate::config::{Architecture, TextArchitecture, TextJson, check_dimensions, check_positive, validate_text};
use crate::error::{Error, Result};
use crate::nn::{Activation, NormKind};
use crate::vision::qwen_vit::{QwenVisionConfig, WindowConfig};

/// A Qwen-VL checkpoint's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVlCheckpoint {
    /// The model.
    pub model: QwenVlConfig,
}

/// `vision_config` of `Qwen2_5_VLVisionConfig` / `Qwen3VLVisionConfig`; `None` takes the
/// family's default.
#[derive(Deserialize, Default)]
struct VisionJson {
    depth: Option<usize>,
    hidden_size: Option<usize>,
    hidden_act: Option<Activation>,
    intermediate_size: Option<usize>,
    num_heads: Option<usize>,
    #[serde(alias = "in_chans")]
    in_channels: Option<usize>,
    patch_size: Option<usize>,
    spatial_merge_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    out_hidden_size: Option<usize>,
    // Qwen2.5-VL
    tokens_per_second: Option<f64>,
    window_size: Option<usize>,
    fullatt_block_indexes: Option<Vec<usize>>,
    // Qwen3-VL
    num_position_embeddings: Option<usize>,
    deepstack_visual_indexes: Option<Vec<usize>>,
}

/// The top level of a Qwen-VL `config.json`; with Qwen2.5-VL's hub files, also the decoder.
#[derive(Deserialize)]
struct TopJson {
    #[serde(default)]
    vision_config: VisionJson,
    text_config: Option<TextJson>,
    image_token_id: Option<u32>,
    video_token_id: Option<u32>,
    vision_start_token_id: Option<u32>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl QwenVlCheckpoint {
    /// Parses and validates `config.json` of a Qwen-VL architecture; also returns the dtype the
    /// file states.
    pub(crate) fn parse(architecture: Architecture, text: &str, path: &Path) -> Result<(Self, Option<String>)> {
        let json = |source| Error::Json { path: path.to_path_buf(), source };
        let top: TopJson = serde_json::from_str(text).map_err(json)?;
        let variant = match architecture {
            Architecture::Qwen3Vl => QwenVlVariant::Qwen3,
            _ => QwenVlVariant::Qwen2_5,
        };
        // Qwen2.5-VL hub files keep the decoder's fields at the top level.
        let text_json = match top.text_config.clone() {
            Some(text) => text,
            None => serde_json::from_str::<TextJson>(text).map_err(json)?,
        };
        let tie = match variant {
            // transformers' backward compatibility: a tied text_config wins over the top level.
            QwenVlVariant::Qwen2_5 => {
                top.tie_word_embeddings.unwrap_or(false) || text_json.tie_word_embeddings.unwrap_or(false)
            }
            QwenVlVariant::Qwen3 => top.tie_word_embeddings.unwrap_or(false),
        };
        let arch = match variant {
            QwenVlVariant::Qwen2_5 => TextArchitecture::Qwen2_5Vl,
            QwenVlVariant::Qwen3 => TextArchitecture::Qwen3Vl,
        };
        let mut text_config = text_json.convert(arch, tie, path)?;
        text_config.tie_word_embeddings = tie;
        let vision = vision_config(&top.vision_config, variant, path)?;
        let model = QwenVlConfig {
            variant,
            vision,
            text: text_config,
            image_token_id: top.image_token_id.unwrap_or(151_655),
            video_token_id: top.video_token_id.unwrap_or(151_656),
            vision_start_token_id: top.vision_start_token_id.unwrap_or(151_652),
            tokens_per_second: top.vision_config.tokens_per_second.unwrap_or(4.0),
        };
        let checkpoint = Self { model };
        checkpoint.validate(path)?;
        let dtype = top.dtype.or(top.torch_dtype).or_else(|| text_json.dtype());
        Ok((checkpoint, dtype))
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let invalid = |message: String| Err(Error::config(path, message));
        let model = &self.model;
        let v = &model.vision;
        check_dimensions(
            &[
                ("vision depth", v.depth),
                ("vision hidden_size", v.hidden_size),
                ("vision intermediate_size", v.intermediate_size),
                ("vision num_heads", v.num_heads),
                ("in_channels", v.in_channels),
                ("patch_size", v.patch_size),
                ("temporal_patch_size", v.temporal_patch_size),
                ("spatial_merge_size", v.spatial_merge_size),
                ("out_hidden_size", v.out_hidden_size),
            ],
            path,
        )?;
        validate_text(&model.text, path)?;
        if [v.depth, v.in_channels, v.patch_size, v.temporal_patch_size, v.spatial_merge_size].contains(&0) {
            return invalid(
                "vision depth, in_channels, patch_size, temporal_patch_size and spatial_merge_size must be positive"
                    .into(),
            );
        }
        if v.num_heads == 0 || !v.hidden_size.is_multiple_of(v.num_heads) || !v.head_dim().is_multiple_of(4) {
            return invalid(format!(
                "vision hidden_size {} over {} heads must give a head width divisible by 4 (2D rotary embedding)",
                v.hidden_size, v.num_heads
            ));
        }
        if v.out_hidden_size != model.text.hidden_size {
            return invalid(format!(
                "vision out_hidden_size {} differs from the decoder's hidden_size {}",
                v.out_hidden_size, model.text.hidden_size
            ));
        }
        if let Some(windows) = &v.windows {
            if windows.size < v.patch_size * v.spatial_merge_size {
                return invalid(format!("window_size {} is smaller than one merged token", windows.size));
            }
            if let Some(bad) = windows.full_attention_blocks.iter().find(|&&i| i >= v.depth) {
                return invalid(format!("fullatt_block_indexes names block {bad} of a {}-block tower", v.depth));
            }
        }
        if let Some(bad) = v.deepstack_indexes.iter().find(|&&i| i >= v.depth) {
            return invalid(format!("deepstack_visual_indexes names block {bad} of a {}-block tower", v.depth));
        }
        if v.deepstack_indexes.len() > model.text.num_hidden_layers {
            return invalid(format!(
                "{} DeepStack features for {} decoder layers",
                v.deepstack_indexes.len(),
                model.text.num_hidden_layers
            ));
        }
        check_positive(&[("tokens_per_second", model.tokens_per_second)], path)?;
        Ok(())
    }
}

/// The vision tower's configuration, with the family's class defaults.
fn vision_config(json: &VisionJson, variant: QwenVlVariant, path: &Path) -> Result<QwenVisionConfig> {
    Ok(match variant {
        QwenVlVariant::Qwen2_5 => QwenVisionConfig {
            depth: json.depth.unwrap_or(32),
            hidden_size: json.hidden_size.unwrap_or(3584),
            intermediate_size: json.intermediate_size.unwrap_or(3420),
            num_heads: json.num_heads.unwrap_or(16),
            in_channels: json.in_channels.unwrap_or(3),
            patch_size: json.patch_size.unwrap_or(14),
            temporal_patch_size: json.temporal_patch_size.unwrap_or(2),
            spatial_merge_size: json.spatial_merge_size.unwrap_or(2),
            out_hidden_size: json.out_hidden_size.unwrap_or(3584),
            hidden_act: json.hidden_act.unwrap_or(Activation::Silu),
            norm: NormKind::RmsNorm,
            gated_mlp: true,
            patch_bias: false,
            windows: Some(WindowConfig {
                size: json.window_size.unwrap_or(112),
                full_attention_blocks: json.fullatt_block_indexes.clone().unwrap_or_else(|| vec![7, 15, 23, 31]),
            }),
            position_table_side: None,
            deepstack_indexes: Vec::new(),
        },
        QwenVlVariant::Qwen3 => {
            let positions = json.num_position_embeddings.unwrap_or(2304);
            let side = positions.isqrt();
            if side * side != positions || side == 0 {
                return Err(Error::config(path, format!("num_position_embeddings {positions} is not a square")));
            }
            QwenVisionConfig {
                depth: json.depth.unwrap_or(27),
                hidden_size: json.hidden_size.unwrap_or(1152),
                intermediate_size: json.intermediate_size.unwrap_or(4304),
                num_heads: json.num_heads.unwrap_or(16),
                in_channels: json.in_channels.unwrap_or(3),
                patch_size: json.patch_size.unwrap_or(16),
                temporal_patch_size: json.temporal_patch_size.unwrap_or(2),
                spatial_merge_size: json.spatial_merge_size.unwrap_or(2),
                out_hidden_size: json.out_hidden_size.unwrap_or(3584),
                hidden_act: json.hidden_act.unwrap_or(Activation::GeluPytorchTanh),
                norm: NormKind::LayerNorm,
                gated_mlp: false,
                patch_bias: true,
                windows: None,
                position_table_side: Some(side),
                deepstack_indexes: json.deepstack_visual_indexes.clone().unwrap_or_else(|| vec![8, 16, 24]),
            }
        }
    })
}
