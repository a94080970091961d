//! Nemotron 3 Nano Omni's `config.json` (`nemotron_h_omni`): its Nemotron-H decoder
//! (`text_config`, or `llm_config` in remote-code files) and, for the standalone decoder,
//! `NemotronHForCausalLM`'s own file. transformers 5 writes `layers_block_type`; hub files a
//! `hybrid_override_pattern` string and Python's bare `Infinity` in `time_step_limit`, which strict
//! JSON refuses (the value is unused: it is read leniently).

use std::path::Path;

use serde::Deserialize;

use crate::config::{check_dimensions, check_positive};
use crate::error::{Error, Result};
use crate::nn::mamba::Mamba2Config;
use crate::nn::moe::MoeConfig;
use crate::text::nemotron_h::{LayerType, NemotronHConfig};

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
