//! The Llava layout (Pixtral-12B, LLaVA-1.5). Hub files, and what transformers 4 and 5 save by
//! default, keep the decoder under `language_model.model.*` with `language_model.lm_head`;
//! transformers 5's in-memory names, which some tools save, nest everything under `model.` with a
//! top-level `lm_head`. A CLIP tower is `vision_tower.vision_model.*` in hub files and
//! `vision_tower.*` in what transformers 5 writes. Every spelling is tried.

use super::{Rename, Source, rename, whole};

/// Hub names: the decoder wrapped in its causal-LM class.
const HUB: &[Rename] =
    &[Rename("^language_model.", "language_model.model."), Rename("^lm_head.", "language_model.lm_head.")];

/// transformers 5's in-memory names.
const NESTED: &[Rename] = &[
    Rename("^language_model.", "model.language_model."),
    Rename("^vision_tower.", "model.vision_tower."),
    Rename("^multi_modal_projector.", "model.multi_modal_projector."),
];

/// CLIP's `CLIPVisionModel` wrapper, present in hub files.
const CLIP_WRAPPER: &[Rename] = &[Rename("^vision_tower.", "vision_tower.vision_model.")];

/// Checkpoint tensors that fill nothing: old CLIP files store their position-id buffer.
pub const IGNORED: &[&str] =
    &["vision_tower.vision_model.embeddings.position_ids", "model.vision_tower.embeddings.position_ids"];

/// Candidate sources for a canonical parameter name, most likely first.
pub fn sources(canonical: &str) -> Vec<Source> {
    let hub = rename(canonical, HUB);
    let mut names = vec![rename(&hub, CLIP_WRAPPER), hub, rename(canonical, NESTED)];
    names.push(rename(&rename(canonical, CLIP_WRAPPER), NESTED));
    names.dedup();
    names.into_iter().map(whole).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(canonical: &str) -> Vec<String> {
        sources(canonical).into_iter().map(|source| source.name).collect()
    }

    #[test]
    fn every_published_spelling_is_a_candidate() {
        let decoder = names("language_model.layers.0.self_attn.q_proj.weight");
        assert!(decoder.contains(&"language_model.model.layers.0.self_attn.q_proj.weight".to_string()));
        assert!(decoder.contains(&"model.language_model.layers.0.self_attn.q_proj.weight".to_string()));
        let head = names("lm_head.weight");
        assert!(
            head.contains(&"language_model.lm_head.weight".to_string()) && head.contains(&"lm_head.weight".to_string())
        );
        let clip = names("vision_tower.encoder.layers.1.mlp.fc1.bias");
        for name in [
            "vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias",
            "vision_tower.encoder.layers.1.mlp.fc1.bias",
            "model.vision_tower.encoder.layers.1.mlp.fc1.bias",
        ] {
            assert!(clip.contains(&name.to_string()), "{name}: {clip:?}");
        }
        assert!(
            names("multi_modal_projector.linear_1.weight")
                .contains(&"model.multi_modal_projector.linear_1.weight".to_string())
        );
    }
}
