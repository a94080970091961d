//! Reading a checkpoint's `config.json`.
//!
//! The serde structs here mirror the files as published, in both layouts of the InternVL family:
//! transformers' (`InternVLForConditionalGeneration`: `vision_config` + `text_config`) and
//! OpenGVLab's (`InternVLChatModel`, `NVLM_D`: `vision_config` + `llm_config`). Missing fields take
//! the defaults of the Python config classes that wrote them, because transformers omits fields
//! equal to their defaults. Both transformers-4 and -5 spellings are accepted (`rope_theta` or
//! `rope_parameters.rope_theta`, `torch_dtype` or `dtype`). The result is one typed
//! [`InternVlConfig`]; which layout the weights are in travels as [`CheckpointLayout`].

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::models::{InternVlConfig, InternVlVariant};
use crate::nn::rope::{RopeScaling, yarn_attention_factor};
use crate::nn::{Activation, NormKind};
use crate::projector::{PixelShuffleVersion, ProjectorConfig};
use crate::text::TextConfig;
use crate::vision::InternVitConfig;

/// The longest context a configuration may declare (`max_position_embeddings`): 16M tokens, beyond
/// any published checkpoint; a larger value is a corrupt file.
pub const MAX_CONTEXT: usize = 1 << 24;

/// The largest width, count or size a configuration may declare (16M, beyond any published
/// checkpoint): products of two stay far inside `usize`.
pub const MAX_DIMENSION: usize = 1 << 24;

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

/// The architectures (`config.json` → `architectures[0]`) this crate loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `InternVLForConditionalGeneration` (InternVL3-*-hf).
    InternVlHf,
    /// `InternVLChatModel` (OpenGVLab InternVL 2 / 2.5 / 3).
    InternVlChat,
    /// `NVLM_D` (NVIDIA NVLM-D-72B).
    NvlmD,
}

impl Architecture {
    const SUPPORTED: &'static str = "InternVLForConditionalGeneration, InternVLChatModel, NVLM_D";

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "InternVLForConditionalGeneration" => Some(Self::InternVlHf),
            "InternVLChatModel" => Some(Self::InternVlChat),
            "NVLM_D" => Some(Self::NvlmD),
            _ => None,
        }
    }
}

/// A parsed `config.json`: the model configuration and how its weights are named.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointConfig {
    /// The architecture named in the file.
    pub architecture: Architecture,
    /// Tensor naming of the checkpoint.
    pub layout: CheckpointLayout,
    /// The model.
    pub model: InternVlConfig,
    /// Image tiling defaults stored in config.json (OpenGVLab layout only; transformers keeps
    /// them in the preprocessor config).
    pub tiling: Option<TilingDefaults>,
    /// The dtype the weights were saved in (`torch_dtype` / `dtype`), if stated.
    pub dtype: Option<String>,
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

impl CheckpointConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses the contents of a `config.json`; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let json = |source| Error::Json { path: path.to_path_buf(), source };
        let head: Head = serde_json::from_str(text).map_err(json)?;
        let architecture =
            head.architectures.iter().find_map(|name| Architecture::from_name(name)).ok_or_else(|| {
                Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    architectures: head.architectures.clone(),
                    supported: Architecture::SUPPORTED.into(),
                }
            })?;
        let config = match architecture {
            Architecture::InternVlHf => serde_json::from_str::<HfConfig>(text).map_err(json)?.convert(path)?,
            Architecture::InternVlChat | Architecture::NvlmD => {
                serde_json::from_str::<OriginalConfig>(text).map_err(json)?.convert(architecture, path)?
            }
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let invalid = |message: String| Err(Error::config(path, message));
        let v = &self.model.vision;
        let t = &self.model.text;
        let p = &self.model.projector;
        let dimensions = [
            ("vision hidden_size", v.hidden_size),
            ("vision num_hidden_layers", v.num_hidden_layers),
            ("vision num_attention_heads", v.num_attention_heads),
            ("vision intermediate_size", v.intermediate_size),
            ("image_size", v.image_size),
            ("patch_size", v.patch_size),
            ("num_channels", v.num_channels),
            ("projector width", p.hidden_size),
            ("vocab_size", t.vocab_size),
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.num_key_value_heads),
            ("head_dim", t.head_dim),
        ];
        if let Some((name, value)) = dimensions.iter().find(|(_, value)| *value > MAX_DIMENSION) {
            return invalid(format!("{name} {value} is beyond {MAX_DIMENSION}"));
        }
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
        if t.num_attention_heads == 0
            || t.num_key_value_heads == 0
            || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads)
        {
            return invalid(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if t.head_dim == 0 || !t.head_dim.is_multiple_of(2) {
            return invalid(format!("head_dim {} must be even for rotary embeddings", t.head_dim));
        }
        if t.vocab_size == 0 || t.hidden_size == 0 || t.num_hidden_layers == 0 {
            return invalid("text vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        let positive = [
            ("vision_config.layer_norm_eps", v.layer_norm_eps),
            ("rms_norm_eps", t.rms_norm_eps),
            ("rope_theta", t.rope_theta),
            ("projector layer_norm_eps", self.model.projector.layer_norm_eps),
        ];
        if let Some((name, value)) = positive.iter().find(|(_, value)| !(value.is_finite() && *value > 0.0)) {
            return invalid(format!("{name} must be a finite number > 0, got {value}"));
        }
        if t.max_position_embeddings == 0 || t.max_position_embeddings > MAX_CONTEXT {
            return invalid(format!(
                "max_position_embeddings {} is outside 1..={MAX_CONTEXT}",
                t.max_position_embeddings
            ));
        }
        let layers = v.num_hidden_layers as i64;
        let select = self.model.select_layer;
        if select == 0 || select > layers || select < -(layers + 1) || select == -(layers + 1) {
            return invalid(format!("select_layer {select} does not name a layer of a {layers}-layer vision tower"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// File mirrors
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    architectures: Vec<String>,
}

/// An int or a `[height, width]` pair, as transformers writes image and patch sizes.
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
enum Size {
    Square(usize),
    Pair([usize; 2]),
}

impl Size {
    fn square(self, what: &str, path: &Path) -> Result<usize> {
        match self {
            Size::Square(side) => Ok(side),
            Size::Pair([h, w]) if h == w => Ok(h),
            Size::Pair([h, w]) => Err(Error::config(path, format!("{what} {h}x{w} is not square"))),
        }
    }
}

/// transformers-5 `rope_parameters` or transformers-4 `rope_scaling` (null for plain RoPE): the
/// type and the fields `modeling_rope_utils.py` reads for it.
#[derive(Deserialize, Clone, Default)]
struct RopeJson {
    rope_theta: Option<f64>,
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    attention_factor: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    truncate: Option<bool>,
}

impl RopeJson {
    /// The scaling this describes, with transformers' defaults for what it leaves out.
    fn scaling(&self, max_position_embeddings: usize, path: &Path) -> Result<RopeScaling> {
        let kind = self.rope_type.as_deref().unwrap_or("default");
        let required = |name: &str, value: Option<f64>| {
            value.filter(|v| v.is_finite() && *v > 0.0).ok_or_else(|| {
                Error::config(path, format!("RoPE scaling {kind:?} needs a finite {name} > 0, got {value:?}"))
            })
        };
        let factor = || {
            let factor = required("factor", self.factor)?;
            if factor < 1.0 {
                return Err(Error::config(path, format!("RoPE scaling factor {factor} is below 1")));
            }
            Ok(factor)
        };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic { factor: factor()? },
            "llama3" => {
                let low_freq_factor = required("low_freq_factor", self.low_freq_factor)?;
                let high_freq_factor = required("high_freq_factor", self.high_freq_factor)?;
                if low_freq_factor == high_freq_factor {
                    return Err(Error::config(path, "llama3 RoPE scaling needs low_freq_factor != high_freq_factor"));
                }
                RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: required(
                        "original_max_position_embeddings",
                        self.original_max_position_embeddings,
                    )?,
                }
            }
            "yarn" => {
                let factor = factor()?;
                let original = self.original_max_position_embeddings.unwrap_or(max_position_embeddings as f64);
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: required("original_max_position_embeddings", Some(original))?,
                    beta_fast: required("beta_fast", Some(self.beta_fast.unwrap_or(32.0)))?,
                    beta_slow: required("beta_slow", Some(self.beta_slow.unwrap_or(1.0)))?,
                    attention_factor: required(
                        "attention_factor",
                        Some(
                            self.attention_factor
                                .unwrap_or_else(|| yarn_attention_factor(factor, self.mscale, self.mscale_all_dim)),
                        ),
                    )?,
                    truncate: self.truncate.unwrap_or(true),
                }
            }
            other => {
                return Err(Error::config(
                    path,
                    format!(
                        "RoPE scaling type {other:?} is not supported (supported: default, linear, dynamic, llama3, yarn)"
                    ),
                ));
            }
        })
    }
}

/// A decoder config (`text_config` or `llm_config`): Qwen2Config / LlamaConfig fields.
#[derive(Deserialize, Clone, Default)]
struct TextJson {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeJson>,
    rope_scaling: Option<RopeJson>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    /// InternLM2's name for biases on `wqkv` and `wo`.
    bias: Option<bool>,
    hidden_act: Option<Activation>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// Decoder architectures the text side supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextArchitecture {
    /// `Qwen2ForCausalLM`: Llama with q/k/v biases.
    Qwen2,
    /// `LlamaForCausalLM`.
    Llama,
    /// `InternLM2ForCausalLM` (OpenGVLab's remote code): Llama computed, with its own tensor names
    /// and q/k/v fused and interleaved per key/value group.
    InternLm2,
}

impl TextJson {
    /// Architecture from `architectures` (what the modeling code dispatches on), else `model_type`.
    fn architecture(&self, default: TextArchitecture, path: &Path) -> Result<TextArchitecture> {
        let named = |name: &str| match name {
            "Qwen2ForCausalLM" | "qwen2" => Some(TextArchitecture::Qwen2),
            "LlamaForCausalLM" | "llama" => Some(TextArchitecture::Llama),
            "InternLM2ForCausalLM" | "internlm2" => Some(TextArchitecture::InternLm2),
            _ => None,
        };
        if let Some(first) = self.architectures.first() {
            return named(first).ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architectures: self.architectures.clone(),
                supported: "decoders Qwen2ForCausalLM, LlamaForCausalLM, InternLM2ForCausalLM".into(),
            });
        }
        match &self.model_type {
            Some(model_type) => named(model_type).ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architectures: vec![model_type.clone()],
                supported: "decoder model types qwen2, llama, internlm2".into(),
            }),
            None => Ok(default),
        }
    }

    /// Converts with the defaults of transformers' Qwen2Config / LlamaConfig (and OpenGVLab's
    /// InternLM2Config).
    fn convert(&self, arch: TextArchitecture, default_tie: bool, path: &Path) -> Result<TextConfig> {
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(match arch {
            TextArchitecture::Qwen2 => 32_768,
            TextArchitecture::Llama | TextArchitecture::InternLm2 => 2_048,
        });
        // transformers 5 keeps the scaling in rope_parameters; 4.x in rope_scaling.
        let rope = self.rope_parameters.as_ref().filter(|p| p.rope_type.is_some()).or(self.rope_scaling.as_ref());
        let rope_scaling = rope.map_or(Ok(RopeScaling::None), |rope| rope.scaling(max_position_embeddings, path))?;
        let rope_theta =
            self.rope_parameters.as_ref().and_then(|p| p.rope_theta).or(self.rope_theta).unwrap_or(10_000.0);
        let hidden_size = self.hidden_size.unwrap_or(4096);
        let heads = self.num_attention_heads.unwrap_or(32);
        if heads == 0 {
            return Err(Error::config(path, "num_attention_heads is 0"));
        }
        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            TextArchitecture::Qwen2 => (true, false),
            TextArchitecture::Llama => (attention_bias, attention_bias),
            // InternLM2Config's `bias` (default true) is on both wqkv and wo.
            TextArchitecture::InternLm2 => (self.bias.unwrap_or(true), self.bias.unwrap_or(true)),
        };
        Ok(TextConfig {
            vocab_size: self.vocab_size.unwrap_or(match arch {
                TextArchitecture::Qwen2 => 151_936,
                TextArchitecture::Llama => 32_000,
                TextArchitecture::InternLm2 => 103_168,
            }),
            hidden_size,
            intermediate_size: self.intermediate_size.unwrap_or(match arch {
                TextArchitecture::Qwen2 => 22_016,
                TextArchitecture::Llama | TextArchitecture::InternLm2 => 11_008,
            }),
            num_hidden_layers: self.num_hidden_layers.unwrap_or(32),
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(hidden_size / heads),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            hidden_act: self.hidden_act.unwrap_or(Activation::Silu),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(default_tie),
        })
    }

    fn dtype(&self) -> Option<String> {
        self.dtype.clone().or_else(|| self.torch_dtype.clone())
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
    fn convert(self, path: &Path) -> Result<CheckpointConfig> {
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
            layer_norm_eps: 1e-5,
            activation: self.projector_hidden_act,
        };
        Ok(CheckpointConfig {
            architecture: Architecture::InternVlHf,
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
            dtype: self.dtype.or(self.torch_dtype).or_else(|| self.text_config.dtype()),
        })
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
    fn convert(self, architecture: Architecture, path: &Path) -> Result<CheckpointConfig> {
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
            layer_norm_eps: 1e-5,
            activation: Activation::Gelu,
        };
        Ok(CheckpointConfig {
            architecture,
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
            dtype: self.dtype.or(self.torch_dtype).or_else(|| self.llm_config.dtype()),
        })
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

    fn parse(json: &str) -> Result<CheckpointConfig> {
        CheckpointConfig::from_json(json, Path::new("config.json"))
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
        let (v4, v5) = (parse(&v4).unwrap(), parse(&v5).unwrap());
        assert_eq!(v4.model.text.rope_theta, 1e6);
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

    fn text_with(rope: &str) -> Result<CheckpointConfig> {
        parse(&format!(
            r#"{{"architectures": ["InternVLForConditionalGeneration"], {HF_VISION},
            "text_config": {{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "max_position_embeddings": 4096, {rope}}}}}"#
        ))
    }

    #[test]
    fn rope_scaling_reads_transformers_4_and_5_spellings() {
        let v4 = text_with(r#""rope_theta": 500000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}"#).unwrap();
        let v5 =
            text_with(r#""rope_parameters": {"rope_type": "dynamic", "factor": 2, "rope_theta": 500000}"#).unwrap();
        assert_eq!(v4.model.text.rope_scaling, RopeScaling::Dynamic { factor: 2.0 });
        assert_eq!(v4.model.text, v5.model.text);
        let llama3 = text_with(
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        assert!(matches!(llama3.model.text.rope_scaling, RopeScaling::Llama3 { factor: 8.0, .. }));
        // YaRN's defaults: beta 32 / 1, the original context from max_position_embeddings, 0.1 ln(f) + 1.
        let yarn = text_with(r#""rope_scaling": {"type": "yarn", "factor": 4.0}"#).unwrap();
        let RopeScaling::Yarn {
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
            ..
        } = yarn.model.text.rope_scaling
        else {
            panic!("{:?}", yarn.model.text.rope_scaling)
        };
        assert_eq!((original_max_position_embeddings, beta_fast, beta_slow, truncate), (4096.0, 32.0, 1.0, true));
        assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
    }

    #[test]
    fn incomplete_or_unknown_rope_scaling_is_a_config_error() {
        for rope in [
            r#""rope_scaling": {"type": "linear"}"#,
            r#""rope_scaling": {"type": "dynamic", "factor": 0.5}"#,
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
            r#""rope_parameters": {"rope_type": "su", "factor": 2.0}"#,
        ] {
            assert!(matches!(text_with(rope), Err(Error::Config { .. })), "{rope}");
        }
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
