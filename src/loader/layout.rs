//! Where each model parameter is found in a checkpoint, per layout: one table per layout, one line
//! per rule (the inverse of transformers' `convert_internvl_weights_to_hf.py`).
//!
//! Parameter names are canonical: transformers' in-memory names without the `model.` prefix
//! (`vision_tower.*`, `multi_modal_projector.*`, `language_model.*`, `lm_head.*`).

use crate::config::CheckpointLayout;

/// A place in the checkpoint that fills one parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Checkpoint tensor name.
    pub name: String,
    /// Which block of rows (`part` of `parts` equal blocks along dim 0); `0` of `1` is the whole tensor.
    pub part: usize,
    /// Number of row blocks the tensor is split into.
    pub parts: usize,
}

/// A substring rewrite from canonical to checkpoint names; `^` anchors it at the start.
struct Rename(&'static str, &'static str);

/// A parameter stored as a block of rows of a fused tensor: `(canonical infix, fused infix, block, blocks)`.
struct Fused(&'static str, &'static str, usize, usize);

/// transformers' hub layout (what `save_pretrained` writes). Each parameter also has a fallback
/// with transformers' in-memory names (`model.` prefix, top-level `lm_head`), which some tools save.
const TRANSFORMERS: &[Rename] = &[
    Rename("^language_model.", "language_model.model."), // Qwen2Model inside Qwen2ForCausalLM
    Rename("^lm_head.", "language_model.lm_head."),
];

const TRANSFORMERS_IN_MEMORY: &[Rename] = &[
    Rename("^vision_tower.", "model.vision_tower."),
    Rename("^multi_modal_projector.", "model.multi_modal_projector."),
    Rename("^language_model.", "model.language_model."),
];

/// OpenGVLab's InternVLChatModel / NVLM-D layout.
const OPENGVLAB_FUSED: &[Fused] = &[
    Fused(".attention.q_proj.", ".attn.qkv.", 0, 3), // qkv rows [0:C]
    Fused(".attention.k_proj.", ".attn.qkv.", 1, 3), // [C:2C]
    Fused(".attention.v_proj.", ".attn.qkv.", 2, 3), // [2C:3C]
];

const OPENGVLAB: &[Rename] = &[
    Rename("^vision_tower.", "vision_model."),
    Rename(".encoder.layer.", ".encoder.layers."),
    Rename(".embeddings.cls_token", ".embeddings.class_embedding"),
    Rename(".embeddings.position_embeddings", ".embeddings.position_embedding"),
    Rename(".embeddings.patch_embeddings.projection.", ".embeddings.patch_embedding."),
    Rename(".attention.projection_layer.", ".attn.proj."),
    Rename(".attention.", ".attn."), // q_norm, k_norm (InternViT-6B)
    Rename(".layernorm_before.", ".norm1."),
    Rename(".layernorm_after.", ".norm2."),
    Rename(".lambda_1", ".ls1"),
    Rename(".lambda_2", ".ls2"),
    Rename("^multi_modal_projector.layer_norm.", "mlp1.0."),
    Rename("^multi_modal_projector.linear_1.", "mlp1.1."), // mlp1.2 is the GELU
    Rename("^multi_modal_projector.linear_2.", "mlp1.3."),
    Rename("^language_model.", "language_model.model."),
    Rename("^lm_head.", "language_model.lm_head."),
];

/// Candidate sources for a canonical parameter name, most likely first.
pub fn sources(layout: CheckpointLayout, canonical: &str) -> Vec<Source> {
    match layout {
        CheckpointLayout::Transformers => {
            vec![whole(rename(canonical, TRANSFORMERS)), whole(rename(canonical, TRANSFORMERS_IN_MEMORY))]
        }
        CheckpointLayout::OpenGvLab => {
            for Fused(part_infix, fused_infix, part, parts) in OPENGVLAB_FUSED {
                if canonical.contains(part_infix) {
                    let fused = canonical.replacen(part_infix, fused_infix, 1);
                    return vec![Source { name: rename(&fused, OPENGVLAB), part: *part, parts: *parts }];
                }
            }
            vec![whole(rename(canonical, OPENGVLAB))]
        }
    }
}

fn whole(name: String) -> Source {
    Source { name, part: 0, parts: 1 }
}

fn rename(name: &str, rules: &[Rename]) -> String {
    let mut name = name.to_string();
    for Rename(from, to) in rules {
        match from.strip_prefix('^') {
            Some(prefix) => {
                if let Some(rest) = name.strip_prefix(prefix) {
                    name = format!("{to}{rest}");
                }
            }
            None => name = name.replacen(from, to, 1),
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(layout: CheckpointLayout, canonical: &str) -> Vec<(String, usize)> {
        sources(layout, canonical).into_iter().map(|s| (s.name, s.part)).collect()
    }

    #[test]
    fn opengvlab_fused_qkv_splits_into_row_blocks() {
        let got = names(CheckpointLayout::OpenGvLab, "vision_tower.encoder.layer.3.attention.k_proj.bias");
        assert_eq!(got, vec![("vision_model.encoder.layers.3.attn.qkv.bias".into(), 1)]);
    }

    #[test]
    fn opengvlab_renames_vision_projector_and_decoder() {
        let cases = [
            ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
            (
                "vision_tower.embeddings.patch_embeddings.projection.weight",
                "vision_model.embeddings.patch_embedding.weight",
            ),
            (
                "vision_tower.encoder.layer.0.attention.q_norm.weight",
                "vision_model.encoder.layers.0.attn.q_norm.weight",
            ),
            (
                "vision_tower.encoder.layer.0.attention.projection_layer.bias",
                "vision_model.encoder.layers.0.attn.proj.bias",
            ),
            ("vision_tower.encoder.layer.10.lambda_2", "vision_model.encoder.layers.10.ls2"),
            ("vision_tower.encoder.layer.1.layernorm_after.weight", "vision_model.encoder.layers.1.norm2.weight"),
            ("multi_modal_projector.linear_2.weight", "mlp1.3.weight"),
            ("language_model.layers.0.self_attn.q_proj.bias", "language_model.model.layers.0.self_attn.q_proj.bias"),
            ("lm_head.weight", "language_model.lm_head.weight"),
        ];
        for (canonical, stored) in cases {
            assert_eq!(names(CheckpointLayout::OpenGvLab, canonical), vec![(stored.to_string(), 0)], "{canonical}");
        }
    }

    #[test]
    fn transformers_layout_prefers_hub_names_then_in_memory_names() {
        assert_eq!(
            names(CheckpointLayout::Transformers, "language_model.norm.weight"),
            vec![("language_model.model.norm.weight".into(), 0), ("model.language_model.norm.weight".into(), 0)]
        );
        assert_eq!(
            names(CheckpointLayout::Transformers, "lm_head.weight"),
            vec![("language_model.lm_head.weight".into(), 0), ("lm_head.weight".into(), 0)]
        );
    }
}
