//! The InternVL family's `config.json`, in both layouts: transformers'
//! (`InternVLForConditionalGeneration`: `vision_config` + `text_config`) and OpenGVLab's
//! (`InternVLChatModel`, `NVLM_D`: `vision_config` + `llm_config`). Missing fields take the
//! defaults of the Python config classes that wrote them. The result is one typed
//! [`InternVlConfig`]; which layout the weights are in travels as [`CheckpointLayout`].

use std::path::Path;

use serde::Deserialize;

use super::{InternVlConfig, InternVlVariant};
use crate::config::{
    Architecture, MAX_DIMENSION, Size, TextArchitecture, TextJson, check_dimensions, check_positive, validate_text,
};
use crate::error::{Error, Result};
use crate::nn::{Activation, NormKind};
use crate::projector::{PixelShuffleVersion, ProjectorConfig};
use crate::vision::InternVitConfig;

/// How tensors are named in a checkpoint's safetensors files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointLayout {
    /// transformers' names: `vision_tower.*`, `multi_modal_projector.*`, `language_model.*`.
    Transformers,
    /// OpenGVLab's names: `vision_model.*` with fused `attn.qkv`, `mlp1.*`, `language_model.model.*`.
    OpenGvLab,
    /// OpenGVLab's names with an InternLM2 decoder: `tok_embeddings`, `attention.wqkv` (q, k and v
    /// interleaved per key/value group), `attention.wo`, `feed_forward.w1/w3/w2`, `output`.
    OpenGvLabInternLm2,
}

/// An InternVL-family checkpoint's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct InternVlCheckpoint {
    /// Tensor naming of the checkpoint.
    pub layout: CheckpointLayout,
    /// The model.
    pub model: InternVlConfig,
    /// Image tiling defaults stored in config.json (OpenGVLab layout only; transformers keeps
    /// them in the preprocessor config).
    pub tiling: Option<TilingDefaults>,
}

/// Dynamic-tiling settings of OpenGVLab checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TilingDefaults {
    /// Whether images are split into tiles at all (`dynamic_image_size`).
    pub dynamic: bool,
    /// Fewest tiles (`min_dynamic_patch`).
    pub min_tiles: usize,
    /// Most tiles, thumbnail excluded (`max_dynamic_patch`).
    pub max_tiles: usize,
    /// Whether a whole-image thumbnail is appended to multi-tile images (`use_thumbnail`).
    pub use_thumbnail: bool,
}

impl InternVlCheckpoint {
    /// Parses and validates `config.json` of an InternVL-family architecture; also returns the
    /// dtype the file states.
    pub(crate) fn parse(architecture: Architecture, text: &str, path: &Path) -> Result<(Self, Option<String>)> {
        let json = |source| Error::Json { path: path.to_path_buf(), source };
        let (checkpoint, dtype) = match architecture {
            Architecture::InternVlHf => serde_json::from_str::<HfConfig>(text).map_err(json)?.convert(path)?,
            _ => serde_json::from_str::<OriginalConfig>(text).map_err(json)?.convert(architecture, path)?,
        };
        checkpoint.validate(path)?;
        Ok((checkpoint, dtype))
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let invalid = |message: String| Err(Error::config(path, message));
        let v = &self.model.vision;
        let p = &self.model.projector;
        check_dimensions(
            &[
                ("vision hidden_size", v.hidden_size),
                ("vision num_hidden_layers", v.num_hidden_layers),
                ("vision num_attention_heads", v.num_attention_heads),
                ("vision intermediate_size", v.intermediate_size),
                ("image_size", v.image_size),
                ("patch_size", v.patch_size),
                ("num_channels", v.num_channels),
                ("projector width", p.hidden_size),
            ],
            path,
        )?;
        validate_text(&self.model.text, path)?;
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return invalid(format!(
                "vision hidden_size {} is not a multiple of num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return invalid(format!("image_size {} is not a multiple of patch_size {}", v.image_size, v.patch_size));
        }
        let factor = self.model.shuffle_factor;
        if factor == 0 || !v.patches_per_side().is_multiple_of(factor) {
            return invalid(format!(
                "{} patches per side cannot be pixel-shuffled by a factor of {factor}",
                v.patches_per_side()
            ));
        }
        check_positive(
            &[("vision_config.layer_norm_eps", v.layer_norm_eps), ("projector layer_norm_eps", p.norm_eps)],
            path,
        )?;
        let layers = v.num_hidden_layers as i64;
        let select = self.model.select_layer;
        if select == 0 || select > layers || select < -(layers + 1) || select == -(layers + 1) {
            return invalid(format!("select_layer {select} does not name a layer of a {layers}-layer vision tower"));
        }
        Ok(())
    }
}

/// `vision_config` of transformers' `InternVLVisionConfig`.
#[derive(Deserialize, Clone)]
struct HfVisionJson {
    #[serde(default = "defaults::vit_hidden")]
    hidden_size: usize,
    #[serde(default = "defaults::vit_layers")]
    num_hidden_layers: usize,
    #[serde(default = "defaults::vit_heads")]
    num_attention_heads: usize,
    #[serde(default = "defaults::vit_intermediate")]
    intermediate_size: usize,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    use_qk_norm: bool,
    #[serde(default = "defaults::layer_norm")]
    norm_type: NormKind,
    #[serde(default = "defaults::vit_eps")]
    layer_norm_eps: f64,
    #[serde(default = "defaults::image_448")]
    image_size: Size,
    #[serde(default = "defaults::patch_14")]
    patch_size: Size,
    #[serde(default = "defaults::channels")]
    num_channels: usize,
    #[serde(default = "defaults::gelu")]
    hidden_act: Activation,
    #[serde(default = "defaults::yes")]
    use_mean_pooling: bool,
    #[serde(default = "defaults::yes")]
    use_absolute_position_embeddings: bool,
}

/// transformers' `InternVLConfig`.
#[derive(Deserialize)]
struct HfConfig {
    vision_config: HfVisionJson,
    #[serde(default)]
    text_config: TextJson,
    #[serde(default = "defaults::image_token_id")]
    image_token_id: u32,
    #[serde(default = "defaults::half")]
    downsample_ratio: f64,
    #[serde(default = "defaults::gelu")]
    projector_hidden_act: Activation,
    #[serde(default = "defaults::last_layer")]
    vision_feature_layer: i64,
    #[serde(default = "defaults::select_strategy")]
    vision_feature_select_strategy: String,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl HfConfig {
    fn convert(self, path: &Path) -> Result<(InternVlCheckpoint, Option<String>)> {
        let v = &self.vision_config;
        if !v.use_mean_pooling {
            return Err(Error::config(
                path,
                "vision_config.use_mean_pooling = false (a final ViT LayerNorm) is not supported",
            ));
        }
        if !v.use_absolute_position_embeddings {
            return Err(Error::config(path, "vision towers without absolute position embeddings are not supported"));
        }
        if self.vision_feature_select_strategy != "default" {
            return Err(Error::config(
                path,
                format!(
                    "vision_feature_select_strategy {:?} is not supported (only \"default\")",
                    self.vision_feature_select_strategy
                ),
            ));
        }
        let vision = InternVitConfig {
            hidden_size: v.hidden_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            intermediate_size: v.intermediate_size,
            norm: v.norm_type,
            layer_norm_eps: v.layer_norm_eps,
            qkv_bias: v.attention_bias,
            qk_norm: v.use_qk_norm,
            image_size: v.image_size.square("image_size", path)?,
            patch_size: v.patch_size.square("patch_size", path)?,
            num_channels: v.num_channels,
            hidden_act: v.hidden_act,
        };
        // transformers 5 ties on the top-level flag (default true); 4.x files may carry it only in text_config.
        let tie = self.tie_word_embeddings.or(self.text_config.tie_word_embeddings).unwrap_or(true);
        let arch = self.text_config.architecture(TextArchitecture::Qwen2, path)?;
        if arch == TextArchitecture::InternLm2 {
            // transformers' converter maps InternLM2 onto Llama; this layout never holds it.
            return Err(Error::config(path, "an InternLM2 decoder in the transformers layout (convert it to Llama)"));
        }
        let mut text = self.text_config.convert(arch, tie, path)?;
        text.tie_word_embeddings = tie;
        let shuffle_factor = shuffle_factor(self.downsample_ratio, path)?;
        let projector = ProjectorConfig {
            input_size: projector_input(vision.hidden_size, shuffle_factor, path)?,
            hidden_size: text.hidden_size,
            output_size: text.hidden_size,
            bias: true,
            norm: Some(NormKind::LayerNorm),
            norm_eps: 1e-5,
            activation: self.projector_hidden_act,
        };
        let dtype = self.dtype.or(self.torch_dtype).or_else(|| self.text_config.dtype());
        let checkpoint = InternVlCheckpoint {
            layout: CheckpointLayout::Transformers,
            model: InternVlConfig {
                variant: InternVlVariant::InternVl,
                vision,
                projector,
                text,
                shuffle_factor,
                pixel_shuffle: PixelShuffleVersion::V2,
                select_layer: self.vision_feature_layer,
                image_token_id: Some(self.image_token_id),
            },
            tiling: None,
        };
        Ok((checkpoint, dtype))
    }
}

/// `vision_config` of OpenGVLab's `InternVisionConfig` (defaults are InternViT-6B's).
#[derive(Deserialize, Clone)]
struct OriginalVisionJson {
    #[serde(default = "defaults::vit6b_hidden")]
    hidden_size: usize,
    #[serde(default = "defaults::vit6b_layers")]
    num_hidden_layers: usize,
    #[serde(default = "defaults::vit6b_heads")]
    num_attention_heads: usize,
    #[serde(default = "defaults::vit6b_intermediate")]
    intermediate_size: usize,
    #[serde(default)]
    qkv_bias: bool,
    #[serde(default = "defaults::yes")]
    qk_normalization: bool,
    #[serde(default = "defaults::rms_norm")]
    norm_type: NormKind,
    #[serde(default = "defaults::vit_eps")]
    layer_norm_eps: f64,
    #[serde(default = "defaults::image_224")]
    image_size: Size,
    #[serde(default = "defaults::patch_14")]
    patch_size: Size,
    #[serde(default = "defaults::channels")]
    num_channels: usize,
    #[serde(default = "defaults::gelu")]
    hidden_act: Activation,
}

/// OpenGVLab's `InternVLChatConfig` (also NVLM-D's `NVLM_D_Config`).
#[derive(Deserialize)]
struct OriginalConfig {
    vision_config: OriginalVisionJson,
    llm_config: TextJson,
    #[serde(default = "defaults::last_layer")]
    select_layer: i64,
    #[serde(default = "defaults::half")]
    downsample_ratio: f64,
    #[serde(default = "defaults::ps_v1")]
    ps_version: PixelShuffleVersion,
    force_image_size: Option<usize>,
    #[serde(default)]
    dynamic_image_size: bool,
    #[serde(default)]
    use_thumbnail: bool,
    #[serde(default = "defaults::one")]
    min_dynamic_patch: usize,
    #[serde(default = "defaults::six")]
    max_dynamic_patch: usize,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl OriginalConfig {
    fn convert(self, architecture: Architecture, path: &Path) -> Result<(InternVlCheckpoint, Option<String>)> {
        let v = &self.vision_config;
        let image_size = v.image_size.square("vision_config.image_size", path)?;
        if let Some(forced) = self.force_image_size.filter(|&forced| forced != image_size) {
            return Err(Error::config(
                path,
                format!(
                    "force_image_size {forced} differs from vision_config.image_size {image_size} (position-embedding interpolation is not supported)"
                ),
            ));
        }
        let vision = InternVitConfig {
            hidden_size: v.hidden_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            intermediate_size: v.intermediate_size,
            norm: v.norm_type,
            layer_norm_eps: v.layer_norm_eps,
            qkv_bias: v.qkv_bias,
            qk_norm: v.qk_normalization,
            image_size,
            patch_size: v.patch_size.square("vision_config.patch_size", path)?,
            num_channels: v.num_channels,
            hidden_act: v.hidden_act,
        };
        let arch = self.llm_config.architecture(TextArchitecture::Qwen2, path)?;
        let text = self.llm_config.convert(arch, false, path)?;
        let shuffle_factor = shuffle_factor(self.downsample_ratio, path)?;
        let nvlm = architecture == Architecture::NvlmD;
        let projector = ProjectorConfig {
            input_size: projector_input(vision.hidden_size, shuffle_factor, path)?,
            // NVLM-D's mlp1 is as wide as the decoder's MLP and has no biases.
            hidden_size: if nvlm { text.intermediate_size } else { text.hidden_size },
            output_size: text.hidden_size,
            bias: !nvlm,
            norm: Some(NormKind::LayerNorm),
            norm_eps: 1e-5,
            activation: Activation::Gelu,
        };
        let dtype = self.dtype.or(self.torch_dtype).or_else(|| self.llm_config.dtype());
        let checkpoint = InternVlCheckpoint {
            layout: match arch {
                TextArchitecture::InternLm2 => CheckpointLayout::OpenGvLabInternLm2,
                _ => CheckpointLayout::OpenGvLab,
            },
            model: InternVlConfig {
                variant: if nvlm { InternVlVariant::NvlmD } else { InternVlVariant::InternVl },
                vision,
                projector,
                text,
                shuffle_factor,
                pixel_shuffle: self.ps_version,
                select_layer: self.select_layer,
                image_token_id: None,
            },
            tiling: Some(TilingDefaults {
                dynamic: self.dynamic_image_size,
                min_tiles: self.min_dynamic_patch,
                max_tiles: self.max_dynamic_patch,
                use_thumbnail: self.use_thumbnail,
            }),
        };
        Ok((checkpoint, dtype))
    }
}

/// Width of the pixel-shuffled features the projector takes: `hidden * factor^2`.
fn projector_input(vision_hidden: usize, factor: usize, path: &Path) -> Result<usize> {
    vision_hidden.checked_mul(factor).and_then(|n| n.checked_mul(factor)).filter(|&n| n <= MAX_DIMENSION).ok_or_else(
        || Error::config(path, format!("vision hidden_size {vision_hidden} x {factor}^2 is beyond {MAX_DIMENSION}")),
    )
}

/// `1 / downsample_ratio`, which must be a whole number.
fn shuffle_factor(downsample_ratio: f64, path: &Path) -> Result<usize> {
    let factor = (1.0 / downsample_ratio).round();
    if downsample_ratio <= 0.0
        || !downsample_ratio.is_finite()
        || (1.0 / downsample_ratio - factor).abs() > 1e-6
        || factor < 1.0
    {
        return Err(Error::config(path, format!("downsample_ratio {downsample_ratio} is not 1/n for a whole n")));
    }
    Ok(factor as usize)
}

/// Defaults of the Python config classes, for fields a file leaves out.
mod defaults {
    use crate::nn::{Activation, NormKind};
    use crate::projector::PixelShuffleVersion;

    use super::Size;

    pub fn vit_hidden() -> usize {
        1024
    }
    pub fn vit_layers() -> usize {
        24
    }
    pub fn vit_heads() -> usize {
        16
    }
    pub fn vit_intermediate() -> usize {
        4096
    }
    pub fn vit6b_hidden() -> usize {
        3200
    }
    pub fn vit6b_layers() -> usize {
        48
    }
    pub fn vit6b_heads() -> usize {
        25
    }
    pub fn vit6b_intermediate() -> usize {
        12800
    }
    pub fn vit_eps() -> f64 {
        1e-6
    }
    pub fn layer_norm() -> NormKind {
        NormKind::LayerNorm
    }
    pub fn rms_norm() -> NormKind {
        NormKind::RmsNorm
    }
    pub fn image_448() -> Size {
        Size::Square(448)
    }
    pub fn image_224() -> Size {
        Size::Square(224)
    }
    pub fn patch_14() -> Size {
        Size::Square(14)
    }
    pub fn channels() -> usize {
        3
    }
    pub fn gelu() -> Activation {
        Activation::Gelu
    }
    pub fn yes() -> bool {
        true
    }
    pub fn image_token_id() -> u32 {
        151_667
    }
    pub fn half() -> f64 {
        0.5
    }
    pub fn last_layer() -> i64 {
        -1
    }
    pub fn select_strategy() -> String {
        "default".into()
    }
    pub fn ps_v1() -> PixelShuffleVersion {
        PixelShuffleVersion::V1
    }
    pub fn one() -> usize {
        1
    }
    pub fn six() -> usize {
        6
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CheckpointConfig;
    use crate::nn::rope::RopeScaling;

    fn checkpoint(json: &str) -> Result<CheckpointConfig> {
        CheckpointConfig::from_json(json, Path::new("config.json"))
    }

    fn parse(json: &str) -> Result<InternVlCheckpoint> {
        checkpoint(json).map(|config| config.internvl().cloned().expect("an InternVL checkpoint"))
    }

    const HF_VISION: &str = r#""vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "image_size": [112, 112], "patch_size": 14}"#;

    #[test]
    fn rope_theta_and_dtype_accept_transformers_4_and_5_spellings() {
        let v4 = format!(
            r#"{{"architectures": ["InternVLForConditionalGeneration"], {HF_VISION}, "torch_dtype": "bfloat16",
            "text_config": {{"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 1000000.0}}}}"#
        );
        let v5 = format!(
            r#"{{"architectures": ["InternVLForConditionalGeneration"], {HF_VISION}, "dtype": "bfloat16",
            "text_config": {{"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
            "rope_parameters": {{"rope_theta": 1000000, "rope_type": "default"}}}}}}"#
        );
        let (v4, v5) = (checkpoint(&v4).unwrap(), checkpoint(&v5).unwrap());
        assert_eq!(v4.text().unwrap().rope_theta, 1e6);
        assert_eq!(v4, v5);
        assert_eq!(v5.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn transformers_layout_defaults_follow_the_python_classes() {
        let config =
            parse(&format!(r#"{{"architectures": ["InternVLForConditionalGeneration"], {HF_VISION}}}"#)).unwrap();
        assert_eq!(config.layout, CheckpointLayout::Transformers);
        assert_eq!(config.model.image_token_id, Some(151_667));
        assert!(!config.model.vision.qkv_bias);
        assert_eq!(config.model.vision.norm, NormKind::LayerNorm);
        assert_eq!(config.model.text.vocab_size, 151_936);
        assert!(config.model.text.qkv_bias && !config.model.text.o_bias);
        assert!(config.model.text.tie_word_embeddings);
        assert_eq!(config.model.pixel_shuffle, PixelShuffleVersion::V2);
        assert_eq!(config.model.tokens_per_tile(), 16);
    }

    #[test]
    fn opengvlab_defaults_are_internvit_6b_and_ps_v1() {
        let config = parse(
            r#"{"architectures": ["InternVLChatModel"], "vision_config": {"image_size": 448},
            "llm_config": {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4}}"#,
        )
        .unwrap();
        let v = &config.model.vision;
        assert_eq!((v.hidden_size, v.num_hidden_layers, v.num_attention_heads), (3200, 48, 25));
        assert!(v.qk_norm && !v.qkv_bias);
        assert_eq!(v.norm, NormKind::RmsNorm);
        assert_eq!(config.model.pixel_shuffle, PixelShuffleVersion::V1);
        assert!(!config.model.text.qkv_bias && !config.model.text.tie_word_embeddings);
        assert_eq!(
            config.tiling,
            Some(TilingDefaults { dynamic: false, min_tiles: 1, max_tiles: 6, use_thumbnail: false })
        );
    }

    #[test]
    fn nvlm_projector_is_bias_free_and_as_wide_as_the_decoder_mlp() {
        let config = parse(
            r#"{"architectures": ["NVLM_D"], "vision_config": {"image_size": 448},
            "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "llama", "hidden_size": 8192,
            "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 29568}}"#,
        )
        .unwrap();
        assert_eq!(config.model.variant, InternVlVariant::NvlmD);
        assert_eq!(config.model.projector.hidden_size, 29568);
        assert!(!config.model.projector.bias);
        // the architecture, not the model_type, decides: Qwen2 has q/k/v biases
        assert!(config.model.text.qkv_bias);
    }

    #[test]
    fn unsupported_rope_scaling_is_refused() {
        let error = parse(&format!(
            r#"{{"architectures": ["InternVLForConditionalGeneration"], {HF_VISION},
            "text_config": {{"hidden_size": 64, "num_attention_heads": 4, "rope_scaling": {{"type": "longrope", "factor": 2.0}}}}}}"#
        ))
        .unwrap_err();
        assert!(error.to_string().contains("longrope"), "{error}");
    }

    #[test]
    fn degenerate_epsilons_and_rope_theta_are_refused() {
        for (field, value) in
            [("rms_norm_eps", "-1"), ("rms_norm_eps", "0"), ("rope_theta", "-5"), ("max_position_embeddings", "0")]
        {
            let error = parse(&format!(
                r#"{{"architectures": ["InternVLForConditionalGeneration"], {HF_VISION},
                "text_config": {{"hidden_size": 64, "num_attention_heads": 4, "{field}": {value}}}}}"#
            ))
            .unwrap_err();
            assert!(matches!(&error, Error::Config { message, .. } if message.contains(field)), "{field}: {error}");
        }
        let vision = HF_VISION.replace("\"patch_size\": 14", "\"patch_size\": 14, \"layer_norm_eps\": -0.1");
        let error = parse(&format!(
            r#"{{"architectures": ["InternVLForConditionalGeneration"], {vision},
            "text_config": {{"hidden_size": 64, "num_attention_heads": 4}}}}"#
        ))
        .unwrap_err();
        assert!(matches!(&error, Error::Config { message, .. } if message.contains("layer_norm_eps")), "{error}");
    }

    #[test]
    fn internlm2_decoder_reads_its_own_field_names() {
        let config = parse(
            r#"{"architectures": ["InternVLChatModel"], "vision_config": {"image_size": 448},
            "llm_config": {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 8,
            "num_key_value_heads": 2, "bias": false, "rope_scaling": {"type": "dynamic", "factor": 3.0}}}"#,
        )
        .unwrap();
        assert_eq!(config.layout, CheckpointLayout::OpenGvLabInternLm2);
        let text = &config.model.text;
        assert!(!text.qkv_bias && !text.o_bias && !text.tie_word_embeddings);
        assert_eq!((text.head_dim, text.vocab_size), (8, 103_168));
        assert_eq!(text.rope_scaling, RopeScaling::Dynamic { factor: 3.0 });
        // InternLM2Config's `bias` defaults to true.
        let biased = parse(
            r#"{"architectures": ["InternVLChatModel"], "vision_config": {"image_size": 448},
            "llm_config": {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 8}}"#,
        )
        .unwrap();
        assert!(biased.model.text.qkv_bias && biased.model.text.o_bias);
    }

    #[test]
    fn select_layer_outside_the_tower_is_refused() {
        let error = parse(&format!(
            r#"{{"architectures": ["InternVLForConditionalGeneration"], {HF_VISION}, "vision_feature_layer": -4,
            "text_config": {{"hidden_size": 64, "num_attention_heads": 4}}}}"#
        ))
        .unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error}");
    }
}
