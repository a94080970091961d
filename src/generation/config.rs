//! What to generate and how: user settings over the checkpoint's `generation_config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Tokens generated when neither the call nor the checkpoint says otherwise.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

/// Generation settings for one call. Every `None` falls back to the checkpoint's
/// `generation_config.json`, then to transformers' defaults.
///
/// ```
/// use vlm::generation::GenerationConfig;
/// let config = GenerationConfig::default().max_new_tokens(64).temperature(0.7).top_p(0.9).seed(42);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate.
    pub max_new_tokens: Option<usize>,
    /// Softmax temperature; `0` means greedy decoding, any positive value samples.
    pub temperature: Option<f32>,
    /// Sample only among the `k` most likely tokens (`0` disables).
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities sum to `p` (`1` disables).
    pub top_p: Option<f32>,
    /// Divides positive and multiplies negative logits of tokens already in the sequence (`1` disables).
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler; the same seed gives the same tokens.
    pub seed: Option<u64>,
    /// Stop when the text contains one of these; the stop string is not part of the output.
    pub stop: Vec<String>,
    /// Replaces the checkpoint's end-of-sequence tokens.
    pub eos_token_ids: Option<Vec<u32>>,
    /// Most tiles per image (InternVL; bounds memory and compute); the checkpoint's setting
    /// otherwise.
    pub max_tiles: Option<usize>,
    /// Fewest pixels an image is resized to (Qwen-VL); the checkpoint's setting otherwise.
    pub min_pixels: Option<u64>,
    /// Most pixels an image is resized to (Qwen-VL; bounds memory and compute); the checkpoint's
    /// setting otherwise.
    pub max_pixels: Option<u64>,
}

impl GenerationConfig {
    /// Sets [`max_new_tokens`](Self::max_new_tokens).
    pub fn max_new_tokens(mut self, tokens: usize) -> Self {
        self.max_new_tokens = Some(tokens);
        self
    }

    /// Sets [`temperature`](Self::temperature) (`0` for greedy).
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Sets [`top_k`](Self::top_k).
    pub fn top_k(mut self, k: usize) -> Self {
        self.top_k = Some(k);
        self
    }

    /// Sets [`top_p`](Self::top_p).
    pub fn top_p(mut self, p: f32) -> Self {
        self.top_p = Some(p);
        self
    }

    /// Sets [`repetition_penalty`](Self::repetition_penalty).
    pub fn repetition_penalty(mut self, penalty: f32) -> Self {
        self.repetition_penalty = Some(penalty);
        self
    }

    /// Sets [`seed`](Self::seed).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Adds a stop string.
    pub fn stop(mut self, stop: impl Into<String>) -> Self {
        self.stop.push(stop.into());
        self
    }

    /// Sets [`eos_token_ids`](Self::eos_token_ids).
    pub fn eos_token_ids(mut self, ids: Vec<u32>) -> Self {
        self.eos_token_ids = Some(ids);
        self
    }

    /// Sets [`max_tiles`](Self::max_tiles).
    pub fn max_tiles(mut self, tiles: usize) -> Self {
        self.max_tiles = Some(tiles);
        self
    }

    /// Sets [`min_pixels`](Self::min_pixels).
    pub fn min_pixels(mut self, pixels: u64) -> Self {
        self.min_pixels = Some(pixels);
        self
    }

    /// Sets [`max_pixels`](Self::max_pixels).
    pub fn max_pixels(mut self, pixels: u64) -> Self {
        self.max_pixels = Some(pixels);
        self
    }

    /// Checks the values a caller may have got wrong.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(Error::Input(message));
        if let Some(t) = self.temperature.filter(|t| !t.is_finite() || *t < 0.0) {
            return invalid(format!("temperature must be a finite number >= 0, got {t}"));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return invalid(format!("top_p must be in (0, 1], got {p}"));
        }
        if let Some(r) = self.repetition_penalty.filter(|r| !r.is_finite() || *r <= 0.0) {
            return invalid(format!("repetition_penalty must be a finite number > 0, got {r}"));
        }
        if self.max_tiles == Some(0) {
            return invalid("max_tiles must be at least 1".into());
        }
        if self.min_pixels == Some(0) || self.max_pixels == Some(0) {
            return invalid("min_pixels and max_pixels must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return invalid("stop strings must not be empty".into());
        }
        Ok(())
    }
}

/// The checkpoint's `generation_config.json` (transformers' `GenerationConfig` defaults for
/// fields it leaves out).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GenerationDefaults {
    /// Whether the checkpoint samples by default.
    #[serde(default)]
    pub do_sample: bool,
    /// Default temperature when sampling.
    #[serde(default = "one")]
    pub temperature: f32,
    /// Default top-k when sampling.
    #[serde(default = "fifty")]
    pub top_k: usize,
    /// Default top-p when sampling.
    #[serde(default = "one")]
    pub top_p: f32,
    /// Default repetition penalty.
    #[serde(default = "one")]
    pub repetition_penalty: f32,
    /// Default generation length.
    pub max_new_tokens: Option<usize>,
    /// End-of-sequence tokens.
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
}

fn one() -> f32 {
    1.0
}

fn fifty() -> usize {
    50
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        Null(()),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(id) => vec![id],
        OneOrMany::Many(ids) => ids,
        OneOrMany::Null(()) => Vec::new(),
    })
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl GenerationDefaults {
    /// Reads `generation_config.json` from a checkpoint directory; defaults when there is none.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let defaults: Self =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: path.clone(), source })?;
        defaults.validate(&path)?;
        Ok(defaults)
    }

    /// Checks the values as [`GenerationConfig::validate`] checks a caller's.
    fn validate(&self, path: &Path) -> Result<()> {
        let settings = GenerationConfig {
            temperature: Some(self.temperature),
            top_p: Some(self.top_p),
            repetition_penalty: Some(self.repetition_penalty),
            ..GenerationConfig::default()
        };
        settings.validate().map_err(|error| match error {
            Error::Input(message) => Error::config(path, message),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_json_reads_one_or_many_eos() {
        let one: GenerationDefaults = serde_json::from_str(r#"{"eos_token_id": 7, "do_sample": true}"#).unwrap();
        assert_eq!((one.eos_token_id, one.do_sample, one.top_k), (vec![7], true, 50));
        let many: GenerationDefaults = serde_json::from_str(r#"{"eos_token_id": [7, 8]}"#).unwrap();
        assert_eq!(many.eos_token_id, vec![7, 8]);
    }

    #[test]
    fn out_of_range_values_in_generation_config_json_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [r#"{"temperature": -1}"#, r#"{"top_p": 5}"#, r#"{"top_p": 0}"#, r#"{"repetition_penalty": 0}"#] {
            std::fs::write(dir.path().join("generation_config.json"), bad).unwrap();
            let error = GenerationDefaults::from_dir(dir.path()).unwrap_err();
            assert!(matches!(error, Error::Config { .. }), "{bad}: {error}");
        }
        std::fs::write(dir.path().join("generation_config.json"), r#"{"temperature": 0.7, "top_p": 0.8}"#).unwrap();
        assert_eq!(GenerationDefaults::from_dir(dir.path()).unwrap().top_p, 0.8);
    }

    #[test]
    fn invalid_settings_are_input_errors() {
        assert!(GenerationConfig::default().temperature(-1.0).validate().is_err());
        assert!(GenerationConfig::default().top_p(0.0).validate().is_err());
        assert!(GenerationConfig::default().repetition_penalty(0.0).validate().is_err());
        assert!(GenerationConfig::default().stop("").validate().is_err());
        assert!(GenerationConfig::default().temperature(0.0).top_p(1.0).validate().is_ok());
    }
}
