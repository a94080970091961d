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

#[cfg(test)]
mod tests {
    use crate::config::{CheckpointConfig, FamilyConfig};
    use crate::models::QwenVlVariant;
    use std::path::Path;

    fn qwen(json: &str) -> super::QwenVlCheckpoint {
        match CheckpointConfig::from_json(json, Path::new("config.json")).unwrap().family {
            FamilyConfig::QwenVl(checkpoint) => checkpoint,
            other => panic!("{other:?}"),
        }
    }

    /// Qwen/Qwen2.5-VL-3B-Instruct's config.json as published (transformers 4: decoder fields at the top).
    const QWEN2_5_VL_3B: &str = r#"{"architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
        "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": true,
        "use_sliding_window": false, "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
        "intermediate_size": 3420, "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936}"#;

    /// Qwen/Qwen3-VL-2B-Instruct's config.json as published (nested, interleaved M-RoPE, DeepStack).
    const QWEN3_VL_2B: &str = r#"{"architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
        "model_type": "qwen3_vl", "text_config": {"attention_bias": false, "attention_dropout": 0.0,
        "bos_token_id": 151643, "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_interleaved": true, "mrope_section": [24, 20, 20],
        "rope_type": "default"}, "rope_theta": 5000000, "tie_word_embeddings": true, "use_cache": true,
        "vocab_size": 151936}, "tie_word_embeddings": true, "transformers_version": "4.57.0.dev0",
        "video_token_id": 151656, "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24,
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02,
        "intermediate_size": 4096, "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
        "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "vision_end_token_id": 151653, "vision_start_token_id": 151652}"#;

    #[test]
    fn published_qwen2_5_vl_config_parses_as_transformers_reads_it() {
        let model = qwen(QWEN2_5_VL_3B).model;
        assert_eq!(model.variant, QwenVlVariant::Qwen2_5);
        let text = &model.text;
        assert_eq!(
            (text.hidden_size, text.num_hidden_layers, text.head_dim, text.num_key_value_heads),
            (2048, 36, 128, 2)
        );
        assert!(text.tie_word_embeddings && text.qkv_bias && !text.o_bias && !text.qk_norm);
        assert_eq!(text.mrope.map(|m| (m.section, m.interleaved)), Some(([16, 24, 24], false)));
        assert_eq!(text.rope_theta, 1e6);
        let vision = &model.vision;
        assert_eq!((vision.depth, vision.hidden_size, vision.out_hidden_size), (32, 1280, 2048));
        assert_eq!(
            vision.windows.as_ref().map(|w| (w.size, w.full_attention_blocks.clone())),
            Some((112, vec![7, 15, 23, 31]))
        );
        assert_eq!((model.image_token_id, model.video_token_id, model.tokens_per_second), (151_655, 151_656, 2.0));
    }

    #[test]
    fn published_qwen3_vl_config_parses_as_transformers_reads_it() {
        let model = qwen(QWEN3_VL_2B).model;
        assert_eq!(model.variant, QwenVlVariant::Qwen3);
        let text = &model.text;
        assert_eq!((text.head_dim, text.num_key_value_heads, text.max_position_embeddings), (128, 8, 262_144));
        assert!(text.tie_word_embeddings && text.qk_norm && !text.qkv_bias);
        assert_eq!(text.mrope.map(|m| (m.section, m.interleaved)), Some(([24, 20, 20], true)));
        assert_eq!(text.rope_theta, 5e6);
        let vision = &model.vision;
        assert_eq!((vision.position_table_side, vision.deepstack_indexes.clone()), (Some(48), vec![5, 11, 17]));
        assert!(vision.windows.is_none() && vision.patch_bias && !vision.gated_mlp);
    }

    #[test]
    fn inconsistent_qwen_configs_are_config_errors() {
        for (from, to) in [
            (r#""mrope_section": [16, 24, 24]"#, r#""mrope_section": [16, 24, 20]"#),
            (r#""fullatt_block_indexes": [7, 15, 23, 31]"#, r#""fullatt_block_indexes": [7, 40]"#),
            (r#""out_hidden_size": 2048"#, r#""out_hidden_size": 1024"#),
            (r#""window_size": 112"#, r#""window_size": 4"#),
        ] {
            let json = QWEN2_5_VL_3B.replace(from, to);
            let error = CheckpointConfig::from_json(&json, Path::new("config.json")).unwrap_err();
            assert!(matches!(error, crate::Error::Config { .. }), "{to}: {error}");
        }
        let json = QWEN3_VL_2B.replace(r#""num_position_embeddings": 2304"#, r#""num_position_embeddings": 2000"#);
        assert!(matches!(
            CheckpointConfig::from_json(&json, Path::new("config.json")),
            Err(crate::Error::Config { .. })
        ));
        let json =
            QWEN3_VL_2B.replace(r#""deepstack_visual_indexes": [5, 11, 17]"#, r#""deepstack_visual_indexes": [5, 30]"#);
        assert!(matches!(
            CheckpointConfig::from_json(&json, Path::new("config.json")),
            Err(crate::Error::Config { .. })
        ));
    }
}
