//! The Llava layout's `config.json` (`LlavaConfig`): Pixtral-12B (`vision_config.model_type:
//! pixtral`, a Mistral `text_config`) and LLaVA-1.5 (`clip_vision_model`, a Llama `text_config`).
//! Published files are partial: what they leave out takes the defaults of the sub-config's own
//! Python class (`PixtralVisionConfig`, `CLIPVisionConfig`, `MistralConfig`, `LlamaConfig`), and
//! transformers 4 and 5 spell RoPE and the dtype differently.

use std::path::Path;

use serde::Deserialize;

use super::{FeatureSelection, LlavaConfig, LlavaVisionConfig};
use crate::config::{Architecture, TextArchitecture, TextJson, check_dimensions, check_positive, validate_text};
use crate::error::{Error, Result};
use crate::nn::Activation;
use crate::projector::ProjectorConfig;
use crate::vision::{ClipVisionConfig, PixtralVisionConfig};

/// A Llava checkpoint's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaCheckpoint {
    /// The model.
    pub model: LlavaConfig,
}

/// `vision_config`: the fields of `PixtralVisionConfig` and `CLIPVisionConfig`.
#[derive(Deserialize, Default)]
struct VisionJson {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    hidden_act: Option<Activation>,
    layer_norm_eps: Option<f64>,
    // Pixtral: 4.x `rope_theta`, 5.x `rope_parameters`.
    rope_theta: Option<f64>,
    rope_parameters: Option<VisionRopeJson>,
}

#[derive(Deserialize)]
struct VisionRopeJson {
    rope_type: Option<String>,
    rope_theta: Option<f64>,
}

/// An int or a list of ints (`vision_feature_layer`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Layers {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Deserialize)]
struct TopJson {
    vision_config: Option<VisionJson>,
    text_config: Option<TextJson>,
    #[serde(alias = "image_token_id")]
    image_token_index: Option<u32>,
    projector_hidden_act: Option<Activation>,
    vision_feature_select_strategy: Option<String>,
    vision_feature_layer: Option<Layers>,
    multimodal_projector_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl LlavaCheckpoint {
    /// Parses and validates `config.json` of `LlavaForConditionalGeneration`; also returns the
    /// dtype the file states.
    pub(crate) fn parse(_architecture: Architecture, text: &str, path: &Path) -> Result<(Self, Option<String>)> {
        let top: TopJson =
            serde_json::from_str(text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        let text_json = top.text_config.clone().unwrap_or_default();
        let arch = text_json.architecture(TextArchitecture::Llama, path)?;
        if !matches!(arch, TextArchitecture::Llama | TextArchitecture::Mistral) {
            return Err(Error::config(path, format!("a Llava text_config must be llama or mistral, got {arch:?}")));
        }
        // transformers' backward compatibility: a tied text_config wins over the top level.
        let tie = top.tie_word_embeddings.unwrap_or(false) || text_json.tie_word_embeddings.unwrap_or(false);
        let mut text_config = text_json.convert(arch, tie, path)?;
        text_config.tie_word_embeddings = tie;

        let vision = vision_config(top.vision_config.as_ref(), path)?;
        let feature_layers = match top.vision_feature_layer.unwrap_or(Layers::One(-2)) {
            Layers::One(layer) => vec![layer],
            Layers::Many(layers) => layers,
        };
        let selection = match top.vision_feature_select_strategy.as_deref().unwrap_or("default") {
            "default" => FeatureSelection::Default,
            "full" => FeatureSelection::Full,
            other => {
                return Err(Error::config(
                    path,
                    format!("vision_feature_select_strategy {other:?} is neither \"default\" nor \"full\""),
                ));
            }
        };
        let projector = ProjectorConfig {
            input_size: vision.hidden_size().saturating_mul(feature_layers.len()),
            hidden_size: text_config.hidden_size,
            output_size: text_config.hidden_size,
            bias: top.multimodal_projector_bias.unwrap_or(true),
            norm: None,
            norm_eps: 0.0,
            activation: top.projector_hidden_act.unwrap_or(Activation::Gelu),
        };
        let model = LlavaConfig {
            vision,
            projector,
            text: text_config,
            feature_layers,
            selection,
            image_token_id: top.image_token_index.unwrap_or(32_000),
        };
        let checkpoint = Self { model };
        checkpoint.validate(path)?;
        let dtype = top.dtype.or(top.torch_dtype).or_else(|| text_json.dtype());
        Ok((checkpoint, dtype))
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let invalid = |message: String| Err(Error::config(path, message));
        let model = &self.model;
        validate_text(&model.text, path)?;
        let vision = &model.vision;
        let (hidden, heads, layers) = (vision.hidden_size(), vision.num_attention_heads(), vision.num_hidden_layers());
        let (channels, patch) = (vision.num_channels(), vision.patch_size());
        check_dimensions(
            &[
                ("vision hidden_size", hidden),
                ("vision intermediate_size", vision.intermediate_size()),
                ("vision num_hidden_layers", layers),
                ("vision num_attention_heads", heads),
                ("num_channels", channels),
                ("patch_size", patch),
            ],
            path,
        )?;
        if hidden == 0 || heads == 0 || !hidden.is_multiple_of(heads) {
            return invalid(format!("vision hidden_size {hidden} is not a multiple of num_attention_heads {heads}"));
        }
        if channels != 3 || patch == 0 || layers == 0 {
            return invalid(format!(
                "the vision tower needs 3 channels (got {channels}), a positive patch_size and at least one block"
            ));
        }
        match vision {
            LlavaVisionConfig::Pixtral(v) => {
                check_positive(&[("vision rope_theta", v.rope_theta)], path)?;
                if !v.head_dim().is_multiple_of(4) {
                    return invalid(format!(
                        "vision hidden_size {hidden} over {heads} heads must give a head width divisible by 4 \
                         (2D rotary embedding)"
                    ));
                }
                if model.selection == FeatureSelection::Default {
                    // transformers would drop the first patch of the packed sequence and then fail
                    // to match features to [IMG] tokens.
                    return invalid(
                        "a Pixtral vision tower needs vision_feature_select_strategy \"full\" (\"default\" drops a patch)"
                            .into(),
                    );
                }
            }
            LlavaVisionConfig::Clip(v) => {
                check_dimensions(&[("image_size", v.image_size)], path)?;
                check_positive(&[("vision layer_norm_eps", v.layer_norm_eps)], path)?;
                if v.image_size < patch {
                    return invalid(format!("image_size {} holds no {patch}-pixel patch", v.image_size));
                }
            }
        }
        if model.feature_layers.is_empty() {
            return invalid("vision_feature_layer is an empty list".into());
        }
        let states = layers as i64 + 1;
        if let Some(bad) = model.feature_layers.iter().find(|&&i| !(-states..states).contains(&i)) {
            return invalid(format!("vision_feature_layer {bad} is outside the {states} hidden states of the tower"));
        }
        Ok(())
    }
}

/// The vision tower's configuration, with its class's defaults. A missing `vision_config` is
/// LlavaConfig's own default (CLIP ViT-L/14 at 336 px); a present one without `model_type` is CLIP.
fn vision_config(json: Option<&VisionJson>, path: &Path) -> Result<LlavaVisionConfig> {
    let Some(json) = json else {
        return Ok(LlavaVisionConfig::Clip(ClipVisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 336,
            patch_size: 14,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }));
    };
    match json.model_type.as_deref().unwrap_or("clip_vision_model") {
        "pixtral" => {
            let rope_theta = match &json.rope_parameters {
                Some(rope) => {
                    if let Some(kind) = rope.rope_type.as_deref().filter(|&kind| kind != "axial") {
                        return Err(Error::config(
                            path,
                            format!("Pixtral vision rope_type {kind:?} is not supported (only \"axial\")"),
                        ));
                    }
                    rope.rope_theta.or(json.rope_theta)
                }
                None => json.rope_theta,
            };
            Ok(LlavaVisionConfig::Pixtral(PixtralVisionConfig {
                hidden_size: json.hidden_size.unwrap_or(1024),
                intermediate_size: json.intermediate_size.unwrap_or(4096),
                num_hidden_layers: json.num_hidden_layers.unwrap_or(24),
                num_attention_heads: json.num_attention_heads.unwrap_or(16),
                num_channels: json.num_channels.unwrap_or(3),
                patch_size: json.patch_size.unwrap_or(16),
                hidden_act: json.hidden_act.unwrap_or(Activation::Gelu),
                rope_theta: rope_theta.unwrap_or(10_000.0),
            }))
        }
        "clip_vision_model" => Ok(LlavaVisionConfig::Clip(ClipVisionConfig {
            hidden_size: json.hidden_size.unwrap_or(768),
            intermediate_size: json.intermediate_size.unwrap_or(3072),
            num_hidden_layers: json.num_hidden_layers.unwrap_or(12),
            num_attention_heads: json.num_attention_heads.unwrap_or(12),
            num_channels: json.num_channels.unwrap_or(3),
            image_size: json.image_size.unwrap_or(224),
            patch_size: json.patch_size.unwrap_or(32),
            hidden_act: json.hidden_act.unwrap_or(Activation::QuickGelu),
            layer_norm_eps: json.layer_norm_eps.unwrap_or(1e-5),
        })),
        other => Err(Error::config(
            path,
            format!("Llava vision tower {other:?} is not supported (supported: pixtral, clip_vision_model)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{FeatureSelection, LlavaVisionConfig};
    use crate::config::{CheckpointConfig, FamilyConfig};
    use crate::error::Error;
    use crate::nn::Activation;

    fn llava(json: &str) -> crate::error::Result<super::LlavaCheckpoint> {
        match CheckpointConfig::from_json(json, Path::new("config.json"))?.family {
            FamilyConfig::Llava(checkpoint) => Ok(checkpoint),
            other => panic!("{other:?}"),
        }
    }

    /// llava-hf/llava-1.5-7b-hf's config.json as published: partial sub-configs.
    const LLAVA_1_5_7B: &str = r#"{"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
        "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
        "vocab_size": 32064}, "tie_word_embeddings": false, "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0", "vision_config": {"hidden_size": 1024, "image_size": 336,
        "intermediate_size": 4096, "model_type": "clip_vision_model", "num_attention_heads": 16,
        "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}"#;

    /// mistral-community/pixtral-12b's config.json as published.
    const PIXTRAL_12B: &str = r#"{"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
        "image_seq_length": 1, "image_token_index": 10, "model_type": "llava", "projector_hidden_act": "gelu",
        "text_config": {"hidden_size": 5120, "head_dim": 128, "intermediate_size": 14336, "is_composition": true,
        "max_position_embeddings": 1024000, "model_type": "mistral", "num_hidden_layers": 40,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0, "sliding_window": null,
        "vocab_size": 131072}, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
        "vision_config": {"head_dim": 64, "hidden_act": "silu", "image_size": 1024, "is_composition": true,
        "model_type": "pixtral", "patch_size": 16, "rope_theta": 10000.0, "tie_word_embeddings": false},
        "vision_feature_layer": -1, "vision_feature_select_strategy": "full"}"#;

    #[test]
    fn published_llava_1_5_config_fills_gaps_with_the_sub_config_class_defaults() {
        let model = llava(LLAVA_1_5_7B).unwrap().model;
        let text = &model.text;
        assert_eq!(
            (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.head_dim),
            (32_064, 4096, 32, 32, 128)
        );
        assert_eq!((text.rope_theta, text.rms_norm_eps, text.sliding_window), (10_000.0, 1e-5, None));
        assert!(!text.tie_word_embeddings);
        let LlavaVisionConfig::Clip(vision) = &model.vision else { panic!("{:?}", model.vision) };
        assert_eq!(
            (vision.hidden_size, vision.image_size, vision.patch_size, vision.num_hidden_layers),
            (1024, 336, 14, 24)
        );
        assert_eq!((vision.hidden_act, vision.layer_norm_eps), (Activation::QuickGelu, 1e-5));
        assert_eq!(
            (model.feature_layers.clone(), model.selection, model.image_token_id),
            (vec![-2], FeatureSelection::Default, 32_000)
        );
        assert_eq!(model.feature_indexes(), vec![23]);
        assert!(model.projector.bias && model.projector.norm.is_none());
        assert_eq!(
            (model.projector.input_size, model.projector.hidden_size, model.projector.activation),
            (1024, 4096, Activation::Gelu)
        );
    }

    #[test]
    fn published_pixtral_config_reads_head_dim_and_the_null_sliding_window() {
        let model = llava(PIXTRAL_12B).unwrap().model;
        let text = &model.text;
        assert_eq!((text.hidden_size, text.num_attention_heads, text.head_dim), (5120, 32, 128));
        assert_eq!((text.rope_theta, text.sliding_window, text.max_position_embeddings), (1e9, None, 1_024_000));
        let LlavaVisionConfig::Pixtral(vision) = &model.vision else { panic!("{:?}", model.vision) };
        assert_eq!((vision.hidden_size, vision.num_hidden_layers, vision.head_dim()), (1024, 24, 64));
        assert_eq!((vision.hidden_act, vision.rope_theta), (Activation::Silu, 10_000.0));
        assert_eq!((model.selection, model.image_token_id), (FeatureSelection::Full, 10));
    }

    #[test]
    fn a_mistral_text_config_without_sliding_window_gets_4096() {
        let json = PIXTRAL_12B.replace(r#""sliding_window": null,"#, "");
        assert_eq!(llava(&json).unwrap().model.text.sliding_window, Some(4096));
    }

    #[test]
    fn transformers_5_spellings_read_the_same() {
        let v5 = PIXTRAL_12B
            .replace(
                r#""rope_theta": 1000000000.0"#,
                r#""rope_parameters": {"rope_type": "default", "rope_theta": 1e9}"#,
            )
            .replace(r#""rope_theta": 10000.0"#, r#""rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}"#)
            .replace("image_token_index", "image_token_id");
        assert_eq!(llava(&v5).unwrap(), llava(PIXTRAL_12B).unwrap());
    }

    #[test]
    fn broken_llava_configs_are_config_errors() {
        for (base, from, to) in [
            (PIXTRAL_12B, r#""full""#, r#""default""#),
            (PIXTRAL_12B, r#""rope_theta": 10000.0"#, r#""rope_parameters": {"rope_type": "2d", "rope_theta": 1e4}"#),
            (PIXTRAL_12B, r#""model_type": "pixtral""#, r#""model_type": "siglip_vision_model""#),
            (LLAVA_1_5_7B, r#""vision_feature_layer": -2"#, r#""vision_feature_layer": 25"#),
            (LLAVA_1_5_7B, r#""vision_feature_layer": -2"#, r#""vision_feature_layer": []"#),
            (
                LLAVA_1_5_7B,
                r#""vision_feature_select_strategy": "default""#,
                r#""vision_feature_select_strategy": "cls""#,
            ),
            (LLAVA_1_5_7B, r#""image_size": 336"#, r#""image_size": 10"#),
            (LLAVA_1_5_7B, r#""num_attention_heads": 16"#, r#""num_attention_heads": 15"#),
        ] {
            let json = base.replace(from, to);
            assert_ne!(json, base, "{to}");
            assert!(matches!(llava(&json), Err(Error::Config { .. })), "{to}: {:?}", llava(&json));
        }
    }
}
