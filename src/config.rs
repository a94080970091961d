//! Reading a checkpoint's `config.json`: which family it holds, and what every family shares —
//! the decoder config mirror (Qwen2 / Llama / InternLM2 field names and the defaults of their
//! Python classes, which transformers omits when equal), RoPE parameters in transformers-4 and -5
//! spellings (`rope_scaling` / `rope_parameters`, `rope_theta`, `torch_dtype` / `dtype`), and the
//! bounds every value must keep. Each family parses the rest beside its model
//! ([`crate::models::internvl::config`]).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
pub use crate::models::internvl::config::{CheckpointLayout, InternVlCheckpoint, TilingDefaults};
pub use crate::models::llava::config::LlavaCheckpoint;
pub use crate::models::nemotron_omni::config::NemotronOmniCheckpoint;
pub use crate::models::qwen_vl::config::QwenVlCheckpoint;
use crate::nn::Activation;
use crate::nn::quant::QuantKind;
use crate::nn::rope::{MultimodalRope, RopeScaling, yarn_attention_factor};
use crate::text::TextConfig;

/// The longest context a configuration may declare (`max_position_embeddings`): 16M tokens, beyond
/// any published checkpoint; a larger value is a corrupt file.
pub const MAX_CONTEXT: usize = 1 << 24;

/// The largest width, count or size a configuration may declare (16M, beyond any published
/// checkpoint): products of two stay far inside `usize`.
pub const MAX_DIMENSION: usize = 1 << 24;

/// The architectures (`config.json` → `architectures[0]`) this crate loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Architecture {
    /// `InternVLForConditionalGeneration` (InternVL3-*-hf).
    InternVlHf,
    /// `InternVLChatModel` (OpenGVLab InternVL 2 / 2.5 / 3).
    InternVlChat,
    /// `NVLM_D` (NVIDIA NVLM-D-72B).
    NvlmD,
    /// `Qwen2_5_VLForConditionalGeneration` (Qwen2.5-VL, NVIDIA Cosmos-Reason1).
    Qwen2_5Vl,
    /// `Qwen3VLForConditionalGeneration` (Qwen3-VL, NVIDIA Cosmos-Reason2).
    Qwen3Vl,
    /// `LlavaForConditionalGeneration` (Pixtral-12B, LLaVA-1.5).
    Llava,
    /// `NemotronH_Omni_Reasoning_V3` (NVIDIA Nemotron 3 Nano Omni).
    NemotronOmni,
}

impl Architecture {
    const SUPPORTED: &'static str = "InternVLForConditionalGeneration, InternVLChatModel, NVLM_D, \
        Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration, LlavaForConditionalGeneration, \
        NemotronH_Omni_Reasoning_V3";

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "InternVLForConditionalGeneration" => Some(Self::InternVlHf),
            "InternVLChatModel" => Some(Self::InternVlChat),
            "NVLM_D" => Some(Self::NvlmD),
            "Qwen2_5_VLForConditionalGeneration" => Some(Self::Qwen2_5Vl),
            "Qwen3VLForConditionalGeneration" => Some(Self::Qwen3Vl),
            "LlavaForConditionalGeneration" => Some(Self::Llava),
            "NemotronH_Omni_Reasoning_V3" | "NemotronH_Nano_Omni_Reasoning_V3" => Some(Self::NemotronOmni),
            _ => None,
        }
    }
}

/// A parsed `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointConfig {
    /// The architecture named in the file.
    pub architecture: Architecture,
    /// The family's own configuration.
    pub family: FamilyConfig,
    /// The dtype the weights were saved in (`torch_dtype` / `dtype`), if stated.
    pub dtype: Option<String>,
}

/// What each family reads from `config.json`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum FamilyConfig {
    /// InternVL and NVLM-D.
    InternVl(InternVlCheckpoint),
    /// Qwen2.5-VL and Qwen3-VL.
    QwenVl(QwenVlCheckpoint),
    /// The Llava layout: Pixtral-12B and LLaVA-1.5.
    Llava(LlavaCheckpoint),
    /// Nemotron 3 Nano Omni.
    NemotronOmni(NemotronOmniCheckpoint),
}

impl CheckpointConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses the contents of a `config.json`; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        // Python-written files may hold bare `Infinity` (Nemotron-H's `time_step_limit`).
        let head: Head = crate::models::nemotron_omni::config::parse_lenient(text, path)?;
        let architecture =
            head.architectures.iter().find_map(|name| Architecture::from_name(name)).ok_or_else(|| {
                Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    architectures: head.architectures.clone(),
                    supported: Architecture::SUPPORTED.into(),
                }
            })?;
        let (family, dtype) = match architecture {
            Architecture::InternVlHf | Architecture::InternVlChat | Architecture::NvlmD => {
                let (checkpoint, dtype) = InternVlCheckpoint::parse(architecture, text, path)?;
                (FamilyConfig::InternVl(checkpoint), dtype)
            }
            Architecture::Qwen2_5Vl | Architecture::Qwen3Vl => {
                let (checkpoint, dtype) = QwenVlCheckpoint::parse(architecture, text, path)?;
                (FamilyConfig::QwenVl(checkpoint), dtype)
            }
            Architecture::Llava => {
                let (checkpoint, dtype) = LlavaCheckpoint::parse(architecture, text, path)?;
                (FamilyConfig::Llava(checkpoint), dtype)
            }
            Architecture::NemotronOmni => {
                let (checkpoint, dtype) = NemotronOmniCheckpoint::parse(architecture, text, path)?;
                (FamilyConfig::NemotronOmni(checkpoint), dtype)
            }
        };
        Ok(Self { architecture, family, dtype })
    }

    /// The InternVL-family configuration, if this checkpoint is one.
    pub fn internvl(&self) -> Option<&InternVlCheckpoint> {
        match &self.family {
            FamilyConfig::InternVl(checkpoint) => Some(checkpoint),
            _ => None,
        }
    }

    /// The configuration of a Llama-family (transformer) decoder, if the checkpoint has one
    /// (Nemotron Omni's hybrid decoder is not).
    pub fn text(&self) -> Option<&TextConfig> {
        match &self.family {
            FamilyConfig::InternVl(checkpoint) => Some(&checkpoint.model.text),
            FamilyConfig::QwenVl(checkpoint) => Some(&checkpoint.model.text),
            FamilyConfig::Llava(checkpoint) => Some(&checkpoint.model.text),
            FamilyConfig::NemotronOmni(_) => None,
        }
    }

    /// The longest sequence the decoder is meant for, in tokens.
    pub fn context_length(&self) -> usize {
        match &self.family {
            FamilyConfig::NemotronOmni(checkpoint) => checkpoint.model.text.max_position_embeddings,
            _ => self.text().map_or(0, TextConfig::context_length),
        }
    }

    /// Whether the output projection reuses the token embeddings.
    pub fn tie_word_embeddings(&self) -> bool {
        match &self.family {
            FamilyConfig::NemotronOmni(checkpoint) => checkpoint.model.text.tie_word_embeddings,
            _ => self.text().is_some_and(|text| text.tie_word_embeddings),
        }
    }

    /// Sets how the decoder's linear layers are quantized as they load.
    pub fn set_quantization(&mut self, quantization: Option<QuantKind>) {
        match &mut self.family {
            FamilyConfig::InternVl(checkpoint) => checkpoint.model.text.quantization = quantization,
            FamilyConfig::QwenVl(checkpoint) => checkpoint.model.text.quantization = quantization,
            FamilyConfig::Llava(checkpoint) => checkpoint.model.text.quantization = quantization,
            FamilyConfig::NemotronOmni(checkpoint) => checkpoint.model.text.quantization = quantization,
        }
    }
}

/// Checks a decoder configuration: sizes within bounds and consistent, epsilons and the RoPE base
/// positive, a context within [`MAX_CONTEXT`].
pub(crate) fn validate_text(t: &TextConfig, path: &Path) -> Result<()> {
    let invalid = |message: String| Err(Error::config(path, message));
    check_dimensions(
        &[
            ("vocab_size", t.vocab_size),
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.num_key_value_heads),
            ("head_dim", t.head_dim),
        ],
        path,
    )?;
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
    check_positive(&[("rms_norm_eps", t.rms_norm_eps), ("rope_theta", t.rope_theta)], path)?;
    if t.max_position_embeddings == 0 || t.max_position_embeddings > MAX_CONTEXT {
        return invalid(format!("max_position_embeddings {} is outside 1..={MAX_CONTEXT}", t.max_position_embeddings));
    }
    Ok(())
}

/// Refuses sizes beyond [`MAX_DIMENSION`].
pub(crate) fn check_dimensions(dimensions: &[(&str, usize)], path: &Path) -> Result<()> {
    match dimensions.iter().find(|(_, value)| *value > MAX_DIMENSION) {
        Some((name, value)) => Err(Error::config(path, format!("{name} {value} is beyond {MAX_DIMENSION}"))),
        None => Ok(()),
    }
}

/// Refuses values that must be finite and positive (epsilons, bases) but are not.
pub(crate) fn check_positive(values: &[(&str, f64)], path: &Path) -> Result<()> {
    match values.iter().find(|(_, value)| !(value.is_finite() && *value > 0.0)) {
        Some((name, value)) => Err(Error::config(path, format!("{name} must be a finite number > 0, got {value}"))),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// File mirrors every family shares
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    architectures: Vec<String>,
}

/// An int or a `[height, width]` pair, as transformers writes image and patch sizes.
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
pub(crate) enum Size {
    Square(usize),
    Pair([usize; 2]),
}

impl Size {
    pub(crate) fn square(self, what: &str, path: &Path) -> Result<usize> {
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
pub(crate) struct RopeJson {
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
    /// Qwen-VL: frequencies per position row (temporal, height, width).
    mrope_section: Option<Vec<usize>>,
}

impl RopeJson {
    /// The scaling this describes, with transformers' defaults for what it leaves out.
    pub(crate) fn scaling(&self, max_position_embeddings: usize, path: &Path) -> Result<RopeScaling> {
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
            // Qwen2-VL's 4.x configs name multimodal RoPE a scaling type; its frequencies are plain.
            "default" | "mrope" => RopeScaling::None,
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

/// A decoder config (`text_config` or `llm_config`): Qwen2Config / LlamaConfig / InternLM2Config
/// fields.
#[derive(Deserialize, Clone, Default)]
pub(crate) struct TextJson {
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
    pub(crate) tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    /// InternLM2's name for biases on `wqkv` and `wo`.
    bias: Option<bool>,
    /// Mistral's sliding window: absent means the class default (4096), `null` none.
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<usize>>,
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
    /// Qwen2.5-VL's decoder (`Qwen2_5_VLTextConfig`): Qwen2 with multimodal RoPE.
    Qwen2_5Vl,
    /// Qwen3-VL's decoder (`Qwen3VLTextConfig`): Qwen3 (q/k RMSNorm, explicit `head_dim`) with
    /// interleaved multimodal RoPE.
    Qwen3Vl,
    /// `MistralForCausalLM` (Pixtral's Mistral NeMo): Llama with an explicit `head_dim` and a
    /// sliding window.
    Mistral,
}

/// Reads a field that may be absent (`None`), `null` (`Some(None)`) or a value.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// The defaults of a decoder's Python config class, for fields a file leaves out.
struct TextDefaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    max_position_embeddings: usize,
    rope_theta: f64,
    mrope_section: [usize; 3],
}

impl TextArchitecture {
    fn defaults(self) -> TextDefaults {
        let llama = TextDefaults {
            vocab_size: 32_000,
            hidden_size: 4096,
            intermediate_size: 11_008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 2048,
            rope_theta: 10_000.0,
            mrope_section: [0; 3],
        };
        match self {
            TextArchitecture::Llama => llama,
            TextArchitecture::Qwen2 => TextDefaults {
                vocab_size: 151_936,
                intermediate_size: 22_016,
                max_position_embeddings: 32_768,
                ..llama
            },
            TextArchitecture::InternLm2 => TextDefaults { vocab_size: 103_168, ..llama },
            TextArchitecture::Mistral => TextDefaults {
                intermediate_size: 14_336,
                num_key_value_heads: Some(8),
                max_position_embeddings: 131_072,
                ..llama
            },
            TextArchitecture::Qwen2_5Vl => TextDefaults {
                vocab_size: 152_064,
                hidden_size: 8192,
                intermediate_size: 29_568,
                num_hidden_layers: 80,
                num_attention_heads: 64,
                num_key_value_heads: Some(8),
                rms_norm_eps: 1e-5,
                max_position_embeddings: 32_768,
                rope_theta: 1_000_000.0,
                mrope_section: [16, 24, 24],
                ..llama
            },
            TextArchitecture::Qwen3Vl => TextDefaults {
                vocab_size: 151_936,
                intermediate_size: 22_016,
                head_dim: Some(128),
                max_position_embeddings: 128_000,
                rope_theta: 500_000.0,
                mrope_section: [24, 20, 20],
                ..llama
            },
        }
    }
}

impl TextJson {
    /// Architecture from `architectures` (what the modeling code dispatches on), else `model_type`.
    pub(crate) fn architecture(&self, default: TextArchitecture, path: &Path) -> Result<TextArchitecture> {
        let named = |name: &str| match name {
            "Qwen2ForCausalLM" | "qwen2" => Some(TextArchitecture::Qwen2),
            "LlamaForCausalLM" | "llama" => Some(TextArchitecture::Llama),
            "InternLM2ForCausalLM" | "internlm2" => Some(TextArchitecture::InternLm2),
            "MistralForCausalLM" | "mistral" => Some(TextArchitecture::Mistral),
            _ => None,
        };
        if let Some(first) = self.architectures.first() {
            return named(first).ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architectures: self.architectures.clone(),
                supported: "decoders Qwen2ForCausalLM, LlamaForCausalLM, InternLM2ForCausalLM, MistralForCausalLM"
                    .into(),
            });
        }
        match &self.model_type {
            Some(model_type) => named(model_type).ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architectures: vec![model_type.clone()],
                supported: "decoder model types qwen2, llama, internlm2, mistral".into(),
            }),
            None => Ok(default),
        }
    }

    /// Converts with the defaults of the architecture's Python config class.
    pub(crate) fn convert(&self, arch: TextArchitecture, default_tie: bool, path: &Path) -> Result<TextConfig> {
        let defaults = arch.defaults();
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(defaults.max_position_embeddings);
        // transformers 5 keeps the scaling in rope_parameters; 4.x in rope_scaling.
        let rope = self.rope_parameters.as_ref().filter(|p| p.rope_type.is_some()).or(self.rope_scaling.as_ref());
        let rope_scaling = rope.map_or(Ok(RopeScaling::None), |rope| rope.scaling(max_position_embeddings, path))?;
        let rope_theta = [&self.rope_parameters, &self.rope_scaling]
            .into_iter()
            .find_map(|rope| rope.as_ref().and_then(|p| p.rope_theta))
            .or(self.rope_theta)
            .unwrap_or(defaults.rope_theta);
        let hidden_size = self.hidden_size.unwrap_or(defaults.hidden_size);
        let heads = self.num_attention_heads.unwrap_or(defaults.num_attention_heads);
        if heads == 0 {
            return Err(Error::config(path, "num_attention_heads is 0"));
        }
        let head_dim = self.head_dim.or(defaults.head_dim).unwrap_or(hidden_size / heads);
        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            TextArchitecture::Qwen2 | TextArchitecture::Qwen2_5Vl => (true, false),
            TextArchitecture::Llama | TextArchitecture::Qwen3Vl => (attention_bias, attention_bias),
            TextArchitecture::Mistral => (false, false),
            // InternLM2Config's `bias` (default true) is on both wqkv and wo.
            TextArchitecture::InternLm2 => (self.bias.unwrap_or(true), self.bias.unwrap_or(true)),
        };
        let mrope = match arch {
            TextArchitecture::Qwen2_5Vl | TextArchitecture::Qwen3Vl => {
                let section = [&self.rope_parameters, &self.rope_scaling]
                    .into_iter()
                    .find_map(|rope| rope.as_ref().and_then(|p| p.mrope_section.clone()))
                    .unwrap_or_else(|| defaults.mrope_section.to_vec());
                let section: [usize; 3] = section.try_into().map_err(|section: Vec<usize>| {
                    Error::config(path, format!("mrope_section {section:?} must have three entries"))
                })?;
                if section.iter().sum::<usize>() * 2 != head_dim {
                    return Err(Error::config(
                        path,
                        format!("mrope_section {section:?} does not cover head_dim {head_dim} / 2 frequencies"),
                    ));
                }
                // transformers ignores `mrope_interleaved`: Qwen3-VL always interleaves, Qwen2.5-VL never.
                Some(MultimodalRope { section, interleaved: arch == TextArchitecture::Qwen3Vl })
            }
            _ => None,
        };
        Ok(TextConfig {
            vocab_size: self.vocab_size.unwrap_or(defaults.vocab_size),
            hidden_size,
            intermediate_size: self.intermediate_size.unwrap_or(defaults.intermediate_size),
            num_hidden_layers: self.num_hidden_layers.unwrap_or(defaults.num_hidden_layers),
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.or(defaults.num_key_value_heads).unwrap_or(heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(defaults.rms_norm_eps),
            rope_theta,
            rope_scaling,
            mrope,
            qk_norm: arch == TextArchitecture::Qwen3Vl,
            // Only Mistral's configs apply it (Qwen2's need use_sliding_window, never set by these).
            sliding_window: match arch {
                TextArchitecture::Mistral => self.sliding_window.unwrap_or(Some(4096)),
                _ => None,
            },
            max_position_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            hidden_act: self.hidden_act.unwrap_or(Activation::Silu),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(default_tie),
            quantization: None,
        })
    }

    pub(crate) fn dtype(&self) -> Option<String> {
        self.dtype.clone().or_else(|| self.torch_dtype.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HF_VISION: &str = r#""vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "image_size": [112, 112], "patch_size": 14}"#;

    fn text_with(rope: &str) -> Result<CheckpointConfig> {
        CheckpointConfig::from_json(
            &format!(
                r#"{{"architectures": ["InternVLForConditionalGeneration"], {HF_VISION},
            "text_config": {{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "max_position_embeddings": 4096, {rope}}}}}"#
            ),
            Path::new("config.json"),
        )
    }

    #[test]
    fn rope_scaling_reads_transformers_4_and_5_spellings() {
        let v4 = text_with(r#""rope_theta": 500000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}"#).unwrap();
        let v5 =
            text_with(r#""rope_parameters": {"rope_type": "dynamic", "factor": 2, "rope_theta": 500000}"#).unwrap();
        assert_eq!(v4.text().unwrap().rope_scaling, RopeScaling::Dynamic { factor: 2.0 });
        assert_eq!(v4.text(), v5.text());
        let llama3 = text_with(
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        assert!(matches!(llama3.text().unwrap().rope_scaling, RopeScaling::Llama3 { factor: 8.0, .. }));
        // YaRN's defaults: beta 32 / 1, the original context from max_position_embeddings, 0.1 ln(f) + 1.
        let yarn = text_with(r#""rope_scaling": {"type": "yarn", "factor": 4.0}"#).unwrap();
        let RopeScaling::Yarn {
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
            ..
        } = yarn.text().unwrap().rope_scaling
        else {
            panic!("{:?}", yarn.text().unwrap().rope_scaling)
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
}
