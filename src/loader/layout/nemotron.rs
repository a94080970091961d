//! The Nemotron 3 Nano Omni layout, and the standalone Nemotron-H decoder's. Hub files (and what
//! transformers 5 saves by default) name the decoder `[language_model.]backbone.*`, the RADIO tower
//! `vision_model.radio_model.model.*` and the projector `mlp1.*`; transformers 5's in-memory names
//! are `[language_model.]model.*`. The Mamba parameters `A_log` and `D` are `a_log` and `d` here.

use super::{Rename, Source, rename, whole};

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
}
