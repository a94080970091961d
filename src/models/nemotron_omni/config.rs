//! Nemotron 3 Nano Omni's `config.json` (`nemotron_h_omni`): its Nemotron-H decoder
//! (`text_config`, or `llm_config` in remote-code files), its RADIO tower (`vision_config`, whose
//! defaults are the published ViT-H) and the projector; and, for the standalone decoder,
//! `NemotronHForCausalLM`'s own file. transformers 5 writes `layers_block_type`; hub files a
//! `hybrid_override_pattern` string and Python's bare `Infinity` in `time_step_limit`, which strict
//! JSON refuses (the value is unused: it is read leniently).

use std::path::Path;

use serde::Deserialize;

use super::NemotronOmniConfig;
use crate::config::{Architecture, check_dimensions, check_positive};
use crate::error::{Error, Result};
use crate::nn::mamba::Mamba2Config;
use crate::nn::moe::MoeConfig;
use crate::nn::{Activation, NormKind};
use crate::projector::ProjectorConfig;
use crate::text::nemotron_h::{LayerType, NemotronHConfig};
use crate::vision::RadioVisionConfig;

/// A Nemotron Omni checkpoint's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NemotronOmniCheckpoint {
    /// The model.
    pub model: NemotronOmniConfig,
}

/// The top level of `config.json`; 5.x names first, the remote-code names they replace after.
#[derive(Deserialize)]
struct TopJson {
    text_config: Option<NemotronHJson>,
    llm_config: Option<NemotronHJson>,
    vision_config: Option<RadioJson>,
    downsample_ratio: Option<f64>,
    projector_hidden_size: Option<usize>,
    vision_hidden_size: Option<usize>,
    vit_hidden_size: Option<usize>,
    image_token_id: Option<u32>,
    img_context_token_id: Option<u32>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// `RadioConfig`'s fields; `None` takes the class default (the published ViT-H).
#[derive(Deserialize, Default)]
struct RadioJson {
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    mlp_ratio: Option<f64>,
    hidden_act: Option<Activation>,
    layer_norm_eps: Option<f64>,
    qkv_bias: Option<bool>,
    use_swiglu_ffn: Option<bool>,
    num_channels: Option<usize>,
    patch_size: Option<usize>,
    max_img_size: Option<usize>,
    num_cls_tokens: Option<usize>,
    num_registers: Option<usize>,
}

impl NemotronOmniCheckpoint {
    /// Parses and validates `config.json` of `NemotronH_Omni_Reasoning_V3`; also returns the dtype
    /// the file states. The tower's prefix tokens, position table and layer scales are settled
    /// against the weights by the loader.
    pub(crate) fn parse(_architecture: Architecture, text: &str, path: &Path) -> Result<(Self, Option<String>)> {
        let top: TopJson = parse_lenient(text, path)?;
        let fail = |message: String| Err(Error::config(path, message));
        let text_json = top.text_config.or(top.llm_config).unwrap_or_default();
        if let Some(layers) = text_json.num_nextn_predict_layers.filter(|&layers| layers > 0) {
            // Such checkpoints (Nemotron 3.5 Super VL) also carry a final LayerNorm on the tower.
            return fail(format!(
                "num_nextn_predict_layers {layers}: multi-token-prediction checkpoints are not supported"
            ));
        }
        let text_config = text_json.convert(path)?;
        let v = top.vision_config.unwrap_or_default();
        let hidden_size = v.hidden_size.unwrap_or(1280);
        if v.use_swiglu_ffn == Some(true) {
            return fail("a RADIO tower with SwiGLU MLPs (use_swiglu_ffn) is not supported".into());
        }
        if v.qkv_bias == Some(false) {
            return fail("a RADIO tower without q/k/v biases (qkv_bias false) is not supported".into());
        }
        let mlp_ratio = v.mlp_ratio.unwrap_or(4.0);
        if !(mlp_ratio.is_finite() && mlp_ratio > 0.0 && mlp_ratio < 1024.0) {
            return fail(format!("vision mlp_ratio {mlp_ratio} must be a number in (0, 1024)"));
        }
        let patch_size = v.patch_size.unwrap_or(16);
        let vision = RadioVisionConfig {
            hidden_size,
            intermediate_size: (hidden_size as f64 * mlp_ratio) as usize,
            num_hidden_layers: v.num_hidden_layers.unwrap_or(32),
            num_attention_heads: v.num_attention_heads.unwrap_or(16),
            num_channels: v.num_channels.unwrap_or(3),
            patch_size,
            position_grid: v.max_img_size.unwrap_or(2048) / patch_size.max(1),
            prefix_tokens: v.num_cls_tokens.unwrap_or(3).saturating_add(v.num_registers.unwrap_or(7)),
            hidden_act: v.hidden_act.unwrap_or(Activation::Gelu),
            layer_norm_eps: v.layer_norm_eps.unwrap_or(1e-6),
            layer_scale: false,
        };
        let ratio = top.downsample_ratio.unwrap_or(0.5);
        if ratio != 0.5 {
            // transformers splits the projected features by 4 tokens per 2x2 block whatever the ratio.
            return fail(format!("downsample_ratio {ratio} is not supported (only 0.5)"));
        }
        let declared = top.vision_hidden_size.or(top.vit_hidden_size).unwrap_or(hidden_size);
        if declared != hidden_size {
            return fail(format!("vision_hidden_size {declared} differs from the tower's hidden_size {hidden_size}"));
        }
        let merge = super::MERGE * super::MERGE;
        let projector = ProjectorConfig {
            input_size: hidden_size.saturating_mul(merge),
            hidden_size: top.projector_hidden_size.unwrap_or(4096),
            output_size: text_config.hidden_size,
            bias: false,
            norm: Some(NormKind::RmsNorm),
            // Hard-coded in transformers, whatever the decoder's epsilon.
            norm_eps: 1e-5,
            activation: Activation::Relu2,
        };
        let Some(image_token_id) = top.image_token_id.or(top.img_context_token_id) else {
            return fail("no image_token_id (img_context_token_id)".into());
        };
        let model = NemotronOmniConfig { vision, projector, text: text_config, image_token_id };
        validate_omni(&model, path)?;
        Ok((Self { model }, top.dtype.or(top.torch_dtype)))
    }
}

/// Checks the tower and the projector (the decoder is checked as it is converted).
pub(crate) fn validate_omni(model: &NemotronOmniConfig, path: &Path) -> Result<()> {
    let fail = |message: String| Err(Error::config(path, message));
    let v = &model.vision;
    check_dimensions(
        &[
            ("vision hidden_size", v.hidden_size),
            ("vision intermediate_size", v.intermediate_size),
            ("vision num_hidden_layers", v.num_hidden_layers),
            ("vision num_attention_heads", v.num_attention_heads),
            ("num_channels", v.num_channels),
            ("patch_size", v.patch_size),
            ("position table side", v.position_grid),
            ("prefix tokens", v.prefix_tokens),
            ("projector_hidden_size", model.projector.hidden_size),
        ],
        path,
    )?;
    check_positive(&[("vision layer_norm_eps", v.layer_norm_eps)], path)?;
    if v.hidden_size == 0 || v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
        return fail(format!(
            "vision hidden_size {} is not a multiple of num_attention_heads {}",
            v.hidden_size, v.num_attention_heads
        ));
    }
    if v.num_channels != 3 || v.patch_size == 0 || v.num_hidden_layers == 0 || v.intermediate_size == 0 {
        return fail("the tower needs 3 channels, a positive patch size and MLP width, and at least one block".into());
    }
    if v.position_grid == 0 {
        return fail(format!("max_img_size holds no {}-pixel patch", v.patch_size));
    }
    if model.projector.hidden_size == 0 {
        return fail("projector_hidden_size must be positive".into());
    }
    Ok(())
}

/// `NemotronHConfig`'s fields (and the legacy aliases its `__post_init__` accepts); `None` takes
/// the class default.
#[derive(Deserialize, Default, Clone)]
pub(crate) struct NemotronHJson {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    #[serde(alias = "layer_types")]
    layers_block_type: Option<Vec<String>>,
    hybrid_override_pattern: Option<String>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    mlp_hidden_act: Option<String>,
    mlp_bias: Option<bool>,
    mamba_num_heads: Option<usize>,
    mamba_head_dim: Option<usize>,
    ssm_state_size: Option<usize>,
    #[serde(alias = "mamba_n_groups")]
    n_groups: Option<usize>,
    #[serde(alias = "mamba_d_conv")]
    conv_kernel: Option<usize>,
    #[serde(alias = "mamba_chunk_size")]
    chunk_size: Option<usize>,
    mamba_hidden_act: Option<String>,
    #[serde(alias = "mamba_conv_bias")]
    use_conv_bias: Option<bool>,
    use_bias: Option<bool>,
    #[serde(alias = "mamba_dt_min")]
    time_step_min: Option<f64>,
    #[serde(alias = "num_local_experts")]
    n_routed_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    moe_shared_expert_intermediate_size: Option<usize>,
    moe_latent_size: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    norm_topk_prob: Option<bool>,
    routed_scaling_factor: Option<f64>,
    layer_norm_epsilon: Option<f64>,
    max_position_embeddings: Option<usize>,
    num_nextn_predict_layers: Option<usize>,
}

impl NemotronHConfig {
    /// Parses a standalone `NemotronHForCausalLM` `config.json` (hub or transformers-5 spelling).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let json: NemotronHJson = parse_lenient(text, path)?;
        json.convert(path)
    }
}

impl NemotronHJson {
    /// The decoder configuration, with `NemotronHConfig`'s defaults for what the file leaves out.
    pub(crate) fn convert(&self, path: &Path) -> Result<NemotronHConfig> {
        let fail = |message: String| Err(Error::config(path, message));
        let layers = match (&self.layers_block_type, &self.hybrid_override_pattern) {
            (Some(names), _) => names
                .iter()
                .map(|name| {
                    LayerType::from_name(name)
                        .ok_or_else(|| Error::config(path, format!("unknown Nemotron-H layer type {name:?}")))
                })
                .collect::<Result<Vec<_>>>()?,
            (None, Some(pattern)) => pattern
                .chars()
                .map(|symbol| {
                    LayerType::from_symbol(symbol).ok_or_else(|| {
                        Error::config(path, format!("unknown symbol {symbol:?} in hybrid_override_pattern {pattern:?}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            (None, None) => vec![LayerType::Mamba, LayerType::Moe, LayerType::Attention, LayerType::Mlp],
        };
        for (what, act, expected) in
            [("mlp_hidden_act", &self.mlp_hidden_act, "relu2"), ("mamba_hidden_act", &self.mamba_hidden_act, "silu")]
        {
            if let Some(act) = act.as_deref().filter(|&act| act != expected) {
                return fail(format!("{what} {act:?} is not supported (only {expected:?})"));
            }
        }
        let hidden_size = self.hidden_size.unwrap_or(4096);
        let eps = self.layer_norm_epsilon.unwrap_or(1e-5);
        let num_attention_heads = self.num_attention_heads.unwrap_or(32);
        let config = NemotronHConfig {
            vocab_size: self.vocab_size.unwrap_or(131_072),
            hidden_size,
            layers,
            num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(8),
            head_dim: self.head_dim.unwrap_or(128),
            intermediate_size: self.intermediate_size.unwrap_or(21_504),
            mlp_bias: self.mlp_bias.unwrap_or(false),
            mamba: Mamba2Config {
                hidden_size,
                num_heads: self.mamba_num_heads.unwrap_or(128),
                head_dim: self.mamba_head_dim.unwrap_or(64),
                state_size: self.ssm_state_size.unwrap_or(128),
                n_groups: self.n_groups.unwrap_or(8),
                conv_kernel: self.conv_kernel.unwrap_or(4),
                chunk_size: self.chunk_size.unwrap_or(128),
                conv_bias: self.use_conv_bias.unwrap_or(true),
                proj_bias: self.use_bias.unwrap_or(false),
                norm_eps: eps,
                time_step_min: self.time_step_min.unwrap_or(0.001),
            },
            moe: MoeConfig {
                hidden_size,
                num_experts: self.n_routed_experts.unwrap_or(8),
                top_k: self.num_experts_per_tok.unwrap_or(2),
                expert_intermediate_size: self.moe_intermediate_size.unwrap_or(7688),
                shared_intermediate_size: self.moe_shared_expert_intermediate_size.unwrap_or(7688),
                n_group: self.n_group.unwrap_or(1),
                topk_group: self.topk_group.unwrap_or(1),
                norm_topk_prob: self.norm_topk_prob.unwrap_or(true),
                routed_scaling_factor: self.routed_scaling_factor.unwrap_or(1.0),
                latent_size: self.moe_latent_size,
                bias: self.mlp_bias.unwrap_or(false),
            },
            layer_norm_epsilon: eps,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            // transformers 5 builds an untied output projection whatever the file says.
            tie_word_embeddings: false,
            quantization: None,
        };
        validate(&config, path)?;
        Ok(config)
    }
}

/// Checks a Nemotron-H configuration: sizes within bounds and consistent.
fn validate(c: &NemotronHConfig, path: &Path) -> Result<()> {
    let fail = |message: String| Err(Error::config(path, message));
    let (m, e) = (&c.mamba, &c.moe);
    check_dimensions(
        &[
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("layers", c.layers.len()),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads),
            ("head_dim", c.head_dim),
            ("intermediate_size", c.intermediate_size),
            ("mamba_num_heads", m.num_heads),
            ("mamba_head_dim", m.head_dim),
            ("ssm_state_size", m.state_size),
            ("n_groups", m.n_groups),
            ("conv_kernel", m.conv_kernel),
            ("chunk_size", m.chunk_size),
            ("n_routed_experts", e.num_experts),
            ("num_experts_per_tok", e.top_k),
            ("moe_intermediate_size", e.expert_intermediate_size),
            ("moe_shared_expert_intermediate_size", e.shared_intermediate_size),
            ("n_group", e.n_group),
            ("topk_group", e.topk_group),
            ("max_position_embeddings", c.max_position_embeddings),
        ],
        path,
    )?;
    check_positive(&[("layer_norm_epsilon", c.layer_norm_epsilon)], path)?;
    if c.vocab_size == 0 || c.hidden_size == 0 || c.layers.is_empty() {
        return fail("vocab_size, hidden_size and the layer pattern must not be empty".into());
    }
    if c.layers.contains(&LayerType::Attention)
        && (c.num_key_value_heads == 0
            || c.head_dim == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads))
    {
        return fail(format!(
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            c.num_attention_heads, c.num_key_value_heads
        ));
    }
    if c.layers.contains(&LayerType::Mamba) {
        if m.num_heads == 0 || m.head_dim == 0 || m.state_size == 0 || m.conv_kernel == 0 || m.chunk_size == 0 {
            return fail("Mamba heads, head_dim, ssm_state_size, conv_kernel and chunk_size must be positive".into());
        }
        if m.n_groups == 0 || !m.num_heads.is_multiple_of(m.n_groups) {
            return fail(format!("mamba_num_heads {} is not a multiple of n_groups {}", m.num_heads, m.n_groups));
        }
        if !(m.time_step_min.is_finite() && m.time_step_min >= 0.0) {
            return fail(format!("time_step_min {} must be a finite number >= 0", m.time_step_min));
        }
    }
    if c.layers.contains(&LayerType::Moe) {
        if e.num_experts == 0 || e.n_group == 0 || !e.num_experts.is_multiple_of(e.n_group) {
            return fail(format!("n_routed_experts {} is not a multiple of n_group {}", e.num_experts, e.n_group));
        }
        // Each group's score is the sum of its two best experts.
        let per_group = e.num_experts / e.n_group;
        if e.top_k == 0 || e.topk_group == 0 || e.topk_group > e.n_group || e.top_k > e.topk_group * per_group {
            return fail(format!(
                "top {} of {} experts in the best {} of {} groups is not possible",
                e.top_k, e.num_experts, e.topk_group, e.n_group
            ));
        }
        if e.n_group > 1 && per_group < 2 {
            return fail("grouped routing needs at least two experts per group".into());
        }
        if !(e.routed_scaling_factor.is_finite() && e.routed_scaling_factor > 0.0) {
            return fail(format!("routed_scaling_factor {} must be a finite number > 0", e.routed_scaling_factor));
        }
    }
    Ok(())
}

/// Parses JSON that Python's `json.dumps` may have written with bare `Infinity`, `-Infinity` or
/// `NaN` (read as `null`).
pub(crate) fn parse_lenient<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    serde_json::from_str(&without_python_floats(text))
        .map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// `text` with the bare non-finite numbers outside strings replaced by `null`.
fn without_python_floats(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            rest = &rest[c.len_utf8()..];
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|token| rest.starts_with(token)) {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        in_string = c == '"';
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_floats_outside_strings_become_null() {
        assert_eq!(
            without_python_floats(r#"{"a": [0.0, Infinity, -Infinity, NaN], "b": "Infinity \" NaN"}"#),
            r#"{"a": [0.0, null, null, null], "b": "Infinity \" NaN"}"#
        );
    }

    #[test]
    fn a_pattern_and_a_list_give_the_same_layers() {
        let pattern = r#"{"hybrid_override_pattern": "ME*M-E", "time_step_limit": [0.0, Infinity]}"#;
        let list = r#"{"layers_block_type": ["linear_attention", "moe", "full_attention", "mamba", "mlp", "moe"]}"#;
        let a = NemotronHConfig::from_json(pattern, Path::new("config.json")).unwrap();
        let b = NemotronHConfig::from_json(list, Path::new("config.json")).unwrap();
        assert_eq!(a.layers, b.layers);
        assert_eq!(a.layers[2], LayerType::Attention);
        for bad in [r#"{"hybrid_override_pattern": "MX"}"#, r#"{"mlp_hidden_act": "gelu"}"#, r#"{"n_group": 3}"#] {
            assert!(matches!(NemotronHConfig::from_json(bad, Path::new("c")), Err(Error::Config { .. })), "{bad}");
        }
    }
}
