//! The Nemotron 3 Nano Omni layout, and the standalone Nemotron-H decoder's. Hub files (and what
//! transformers 5 saves by default) name the decoder `[language_model.]backbone.*`, the RADIO tower
//! `vision_model.radio_model.model.*` and the projector `mlp1.*`; transformers 5's in-memory names
//! are `[language_model.]model.*`. The Mamba parameters `A_log` and `D` are `a_log` and `d` here.

use super::{Rename, Source, rename, whole};

/// Where the published checkpoint (and transformers 5's `save_pretrained`) keeps the RADIO tower.
pub const RADIO: &str = "vision_model.radio_model.model.";

/// Checkpoint tensors an image-only model does not use: the tower's video embedder, CLS-summary
/// indexes and input conditioner, the audio tower and its projector, multi-token prediction.
pub fn is_ignored(name: &str) -> bool {
    name.ends_with("summary_idxs")
        || name.ends_with("patch_generator.video_embedder.weight")
        || name.ends_with(".video_patch_projection.weight")
        || name.starts_with("vision_model.radio_model.input_conditioner.")
        || ["sound_encoder.", "sound_projection.", "audio_tower.", "embed_audio.", "mtp.", "language_model.mtp."]
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// Candidate sources for a canonical parameter name of the Omni model: the tower under
/// [`RADIO`], the projector as `mlp1.{0,1,3}` (OpenGVLab's `Sequential` indexes), the decoder as
/// [`sources`] finds it.
pub fn omni_sources(canonical: &str) -> Vec<Source> {
    if let Some(tower) = canonical.strip_prefix("vision_model.") {
        return vec![whole(format!("{RADIO}{tower}"))];
    }
    if let Some(projector) = canonical.strip_prefix("multi_modal_projector.") {
        let index = match projector.split('.').next() {
            Some("layer_norm") => "0",
            Some("linear_1") => "1",
            Some("linear_2") => "3",
            _ => return vec![whole(canonical.to_string())],
        };
        let rest = projector.split_once('.').map_or("", |(_, rest)| rest);
        return vec![whole(format!("mlp1.{index}.{rest}")), whole(canonical.to_string())];
    }
    sources(canonical)
}

/// Parameter names that differ from the checkpoint's only by case.
const MAMBA: &[Rename] = &[Rename(".mixer.a_log", ".mixer.A_log"), Rename(".mixer.d", ".mixer.D")];

/// Candidate sources for a canonical parameter name, most likely first.
pub fn sources(canonical: &str) -> Vec<Source> {
    let name = if canonical.ends_with(".mixer.a_log") || canonical.ends_with(".mixer.d") {
        rename(canonical, MAMBA)
    } else {
        canonical.to_string()
    };
    let names = match name.strip_prefix("language_model.") {
        Some(decoder) => vec![
            format!("language_model.backbone.{decoder}"),
            format!("language_model.model.{decoder}"),
            format!("backbone.{decoder}"),
            format!("model.{decoder}"),
        ],
        None if name == "lm_head.weight" => vec!["language_model.lm_head.weight".into(), name],
        None => vec![name],
    };
    names.into_iter().map(whole).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(canonical: &str) -> Vec<String> {
        sources(canonical).into_iter().map(|source| source.name).collect()
    }

    #[test]
    fn decoder_names_of_the_omni_and_the_standalone_checkpoints() {
        assert_eq!(names("language_model.layers.0.mixer.a_log")[0], "language_model.backbone.layers.0.mixer.A_log");
        assert!(names("language_model.layers.3.mixer.d").contains(&"backbone.layers.3.mixer.D".to_string()));
        assert!(names("language_model.layers.3.mixer.dt_bias").contains(&"model.layers.3.mixer.dt_bias".to_string()));
        assert_eq!(names("lm_head.weight"), ["language_model.lm_head.weight", "lm_head.weight"]);
    }

    #[test]
    fn omni_names_of_the_tower_and_the_projector() {
        let omni = |canonical: &str| omni_sources(canonical).into_iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(
            omni("vision_model.blocks.2.attn.qkv.bias"),
            ["vision_model.radio_model.model.blocks.2.attn.qkv.bias"]
        );
        assert_eq!(omni("multi_modal_projector.layer_norm.weight")[0], "mlp1.0.weight");
        assert_eq!(omni("multi_modal_projector.linear_2.weight")[0], "mlp1.3.weight");
        assert_eq!(omni("language_model.norm_f.weight")[0], "language_model.backbone.norm_f.weight");
        assert!(is_ignored("vision_model.radio_model.summary_idxs"));
        assert!(is_ignored("sound_encoder.encoder.layers.0.conv.weight"));
        assert!(!is_ignored("vision_model.radio_model.model.patch_generator.embedder.weight"));
    }
}
