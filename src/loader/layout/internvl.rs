//! The InternVL family's layouts, one table per layout (the inverse of transformers'
//! `convert_internvl_weights_to_hf.py`).

use super::{Rename, Rows, Source, rename, whole};
use crate::models::internvl::CheckpointLayout;
use crate::text::TextConfig;

/// A parameter stored as a block of rows of a fused tensor: `(canonical infix, fused infix, block, blocks)`.
struct Fused(&'static str, &'static str, usize, usize);

/// Which of q, k, v a parameter of InternLM2's interleaved `wqkv` is.
#[derive(Clone, Copy)]
enum Qkv {
    Q,
    K,
    V,
}

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

/// InternLM2's decoder names (OpenGVLab's `modeling_internlm2.py`) inside OpenGVLab's
/// `language_model.model.*`; the vision tower and projector follow [`OPENGVLAB`].
const INTERNLM2: &[Rename] = &[
    Rename("^language_model.embed_tokens.", "language_model.model.tok_embeddings."),
    Rename("^language_model.layers.", "language_model.model.layers."),
    Rename("^language_model.norm.", "language_model.model.norm."),
    Rename(".self_attn.o_proj.", ".attention.wo."),
    Rename(".mlp.gate_proj.", ".feed_forward.w1."),
    Rename(".mlp.up_proj.", ".feed_forward.w3."),
    Rename(".mlp.down_proj.", ".feed_forward.w2."),
    Rename(".input_layernorm.", ".attention_norm."),
    Rename(".post_attention_layernorm.", ".ffn_norm."),
    Rename("^lm_head.", "language_model.output."),
];

/// InternLM2's `wqkv`: per key/value head, its query heads, then its key, then its value.
const INTERNLM2_QKV: &[(&str, Qkv)] =
    &[(".self_attn.q_proj.", Qkv::Q), (".self_attn.k_proj.", Qkv::K), (".self_attn.v_proj.", Qkv::V)];

/// Candidate sources for a canonical parameter name, most likely first. `text` gives the head
/// geometry fused tensors are split by.
pub fn sources(layout: CheckpointLayout, canonical: &str, text: &TextConfig) -> Vec<Source> {
    match layout {
        CheckpointLayout::Transformers => {
            vec![whole(rename(canonical, TRANSFORMERS)), whole(rename(canonical, TRANSFORMERS_IN_MEMORY))]
        }
        CheckpointLayout::OpenGvLab => vec![opengvlab(canonical)],
        CheckpointLayout::OpenGvLabInternLm2 if canonical.starts_with("language_model.") => {
            for &(infix, which) in INTERNLM2_QKV {
                if canonical.contains(infix) {
                    let fused = canonical.replacen(infix, ".attention.wqkv.", 1);
                    return vec![Source { name: rename(&fused, INTERNLM2), rows: interleaved_qkv(which, text) }];
                }
            }
            vec![whole(rename(canonical, INTERNLM2))]
        }
        CheckpointLayout::OpenGvLabInternLm2 if canonical.starts_with("lm_head.") => {
            vec![whole(rename(canonical, INTERNLM2))]
        }
        CheckpointLayout::OpenGvLabInternLm2 => vec![opengvlab(canonical)],
    }
}

fn opengvlab(canonical: &str) -> Source {
    for Fused(part_infix, fused_infix, index, count) in OPENGVLAB_FUSED {
        if canonical.contains(part_infix) {
            let fused = canonical.replacen(part_infix, fused_infix, 1);
            return Source { name: rename(&fused, OPENGVLAB), rows: Rows::Block { index: *index, count: *count } };
        }
    }
    whole(rename(canonical, OPENGVLAB))
}

/// The rows of InternLM2's `wqkv` that hold q, k or v: each of the `kv_heads` groups has
/// `heads / kv_heads` query heads, one key head and one value head, `head_dim` rows each.
fn interleaved_qkv(which: Qkv, text: &TextConfig) -> Rows {
    let d = text.head_dim;
    let queries = text.num_attention_heads / text.num_key_value_heads.max(1);
    let (offset, take) = match which {
        Qkv::Q => (0, queries * d),
        Qkv::K => (queries * d, d),
        Qkv::V => ((queries + 1) * d, d),
    };
    Rows::Strided { groups: text.num_key_value_heads, group_rows: (queries + 2) * d, offset, take }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::layout::Rows;

    fn names(layout: CheckpointLayout, canonical: &str) -> Vec<(String, usize)> {
        let text = TextConfig::tiny();
        sources(layout, canonical, &text)
            .into_iter()
            .map(|s| {
                let block = match s.rows {
                    Rows::Block { index, .. } => index,
                    _ => 0,
                };
                (s.name, block)
            })
            .collect()
    }

    #[test]
    fn opengvlab_fused_qkv_splits_into_row_blocks() {
        let got = names(CheckpointLayout::OpenGvLab, "vision_tower.encoder.layer.3.attention.k_proj.bias");
        assert_eq!(got, vec![("vision_model.encoder.layers.3.attn.qkv.bias".into(), 1)]);
        assert_eq!(Rows::Block { index: 1, count: 3 }.ranges(4), vec![4..8]);
    }

    #[test]
    fn internlm2_decoder_names_and_interleaved_wqkv() {
        let layout = CheckpointLayout::OpenGvLabInternLm2;
        let cases = [
            ("language_model.embed_tokens.weight", "language_model.model.tok_embeddings.weight"),
            ("language_model.layers.1.self_attn.o_proj.weight", "language_model.model.layers.1.attention.wo.weight"),
            ("language_model.layers.1.mlp.gate_proj.weight", "language_model.model.layers.1.feed_forward.w1.weight"),
            ("language_model.layers.1.mlp.up_proj.weight", "language_model.model.layers.1.feed_forward.w3.weight"),
            ("language_model.layers.1.mlp.down_proj.weight", "language_model.model.layers.1.feed_forward.w2.weight"),
            ("language_model.layers.0.input_layernorm.weight", "language_model.model.layers.0.attention_norm.weight"),
            (
                "language_model.layers.0.post_attention_layernorm.weight",
                "language_model.model.layers.0.ffn_norm.weight",
            ),
            ("language_model.norm.weight", "language_model.model.norm.weight"),
            ("lm_head.weight", "language_model.output.weight"),
            ("vision_tower.encoder.layer.0.lambda_1", "vision_model.encoder.layers.0.ls1"),
            ("multi_modal_projector.linear_1.bias", "mlp1.1.bias"),
        ];
        for (canonical, stored) in cases {
            assert_eq!(names(layout, canonical), vec![(stored.to_string(), 0)], "{canonical}");
        }
        // tiny: 4 query heads over 2 key/value heads of 16: per group q0 q1 k v, 64 rows.
        let text = TextConfig::tiny();
        let source = |name: &str| sources(layout, &format!("language_model.layers.0.self_attn.{name}.weight"), &text);
        let wqkv = "language_model.model.layers.0.attention.wqkv.weight".to_string();
        assert!(source("q_proj").iter().chain(&source("k_proj")).all(|s| s.name == wqkv));
        assert_eq!(source("q_proj")[0].rows.ranges(64), vec![0..32, 64..96]);
        assert_eq!(source("k_proj")[0].rows.ranges(32), vec![32..48, 96..112]);
        assert_eq!(source("v_proj")[0].rows.ranges(32), vec![48..64, 112..128]);
        assert_eq!(source("v_proj")[0].rows.stored(32), 128);
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
