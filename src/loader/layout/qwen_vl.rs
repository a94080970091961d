//! The Qwen-VL families' layouts. Qwen2.5-VL hub files (and what transformers 4 and 5 save by
//! default) name the tower `visual.*` and the decoder `model.*`; transformers 5's in-memory
//! names, which some tools save, and every Qwen3-VL file use `model.visual.*` and
//! `model.language_model.*`. Both are tried. Qwen2.5-VL calls its merger's parts `ln_q`,
//! `mlp.0`, `mlp.2` where Qwen3-VL (and the canonical names) say `norm`, `linear_fc1`,
//! `linear_fc2`.

use super::{Rename, Source, rename, whole};
use crate::models::QwenVlVariant;

/// The legacy layout: `visual.*`, `model.*`, `lm_head`.
const LEGACY: &[Rename] = &[Rename("^language_model.", "model.")];

/// transformers 5's in-memory names.
const NESTED: &[Rename] = &[Rename("^visual.", "model.visual."), Rename("^language_model.", "model.language_model.")];

/// Qwen2.5-VL's names for the final merger.
const QWEN2_5_MERGER: &[Rename] = &[
    Rename(".merger.norm.", ".merger.ln_q."),
    Rename(".merger.linear_fc1.", ".merger.mlp.0."),
    Rename(".merger.linear_fc2.", ".merger.mlp.2."),
];

/// Candidate sources for a canonical parameter name, most likely first.
pub fn sources(variant: QwenVlVariant, canonical: &str) -> Vec<Source> {
    let canonical = match variant {
        // The leading dot lets the merger rules match at the start too.
        QwenVlVariant::Qwen2_5 => rename(&format!(".{canonical}"), QWEN2_5_MERGER)[1..].to_string(),
        QwenVlVariant::Qwen3 => canonical.to_string(),
    };
    let legacy = whole(rename(&canonical, LEGACY));
    let nested = whole(rename(&canonical, NESTED));
    match variant {
        QwenVlVariant::Qwen2_5 => vec![legacy, nested],
        QwenVlVariant::Qwen3 => vec![nested, legacy],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(variant: QwenVlVariant, canonical: &str) -> Vec<String> {
        sources(variant, canonical).into_iter().map(|source| source.name).collect()
    }

    #[test]
    fn qwen2_5_reads_hub_names_then_transformers_5_names() {
        assert_eq!(
            names(QwenVlVariant::Qwen2_5, "language_model.layers.0.self_attn.q_proj.bias"),
            ["model.layers.0.self_attn.q_proj.bias", "model.language_model.layers.0.self_attn.q_proj.bias"]
        );
        assert_eq!(
            names(QwenVlVariant::Qwen2_5, "visual.merger.norm.weight"),
            ["visual.merger.ln_q.weight", "model.visual.merger.ln_q.weight"]
        );
        assert_eq!(names(QwenVlVariant::Qwen2_5, "visual.merger.linear_fc2.bias")[0], "visual.merger.mlp.2.bias");
        assert_eq!(names(QwenVlVariant::Qwen2_5, "lm_head.weight"), ["lm_head.weight", "lm_head.weight"]);
    }

    #[test]
    fn qwen3_names_are_nested_and_keep_the_merger_names() {
        assert_eq!(
            names(QwenVlVariant::Qwen3, "visual.deepstack_merger_list.1.linear_fc1.weight")[0],
            "model.visual.deepstack_merger_list.1.linear_fc1.weight"
        );
        assert_eq!(names(QwenVlVariant::Qwen3, "visual.merger.norm.bias")[0], "model.visual.merger.norm.bias");
        assert_eq!(names(QwenVlVariant::Qwen3, "language_model.norm.weight")[0], "model.language_model.norm.weight");
    }
}
