//! The crate's error type. Every variant says what went wrong and where, so a message alone is
//! enough to act on.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A JSON file (config.json, an index, ...) is not valid JSON or does not have the expected fields.
    #[error("malformed {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        source: serde_json::Error,
    },

    /// A configuration value is missing, out of range or inconsistent with another one.
    #[error("invalid configuration in {path}: {message}")]
    Config {
        /// The file the value came from.
        path: PathBuf,
        /// Which value and why.
        message: String,
    },

    /// config.json names an architecture this crate does not implement.
    #[error("unsupported architecture {architectures:?} in {path} (supported: {supported})")]
    UnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// The `architectures` list found there.
        architectures: Vec<String>,
        /// The architectures this crate can load.
        supported: String,
    },

    /// A safetensors file is truncated, corrupt or otherwise unreadable.
    #[error("corrupt safetensors file {path}: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The checkpoint's tensors do not match the model: some parameters were not found, or some
    /// tensors were not used by any parameter.
    #[error("{}", weights_message(missing, unused))]
    Weights {
        /// Model parameters (canonical names) that no checkpoint tensor filled.
        missing: Vec<String>,
        /// Checkpoint tensors (names as in the file) that no parameter used.
        unused: Vec<String>,
    },

    /// A checkpoint tensor has a different shape than the parameter it fills.
    #[error("tensor {name} has shape {found:?} in the checkpoint, but the model expects {expected:?}")]
    ShapeMismatch {
        /// The checkpoint tensor's name.
        name: String,
        /// The shape the model configuration implies.
        expected: Vec<usize>,
        /// The shape stored in the checkpoint.
        found: Vec<usize>,
    },

    /// A checkpoint tensor is stored in a data type that cannot be loaded as model weights.
    #[error("tensor {name} is stored as {dtype}, expected float32, float16 or bfloat16")]
    UnsupportedDtype {
        /// The checkpoint tensor's name.
        name: String,
        /// The stored data type.
        dtype: String,
    },

    /// The number of image-context tokens in the prompt differs from the number of image features.
    #[error("the prompt has {image_tokens} image-context tokens but the images produce {image_features} features")]
    InputMismatch {
        /// Image-context tokens found in `input_ids`.
        image_tokens: usize,
        /// Feature vectors produced by the vision tower and projector.
        image_features: usize,
    },

    /// Model inputs are malformed (wrong rank, empty, out of range).
    #[error("invalid input: {0}")]
    Input(String),

    /// An image could not be decoded (unknown format, truncated or corrupt data).
    #[error("cannot decode image{}: {reason}", source_name.as_ref().map(|s| format!(" {s}")).unwrap_or_default())]
    Image {
        /// The file, when the image came from one.
        source_name: Option<String>,
        /// What the decoder said.
        reason: String,
    },

    /// An image has no pixels.
    #[error("image{} has zero size ({width}x{height})", source_name.as_ref().map(|s| format!(" {s}")).unwrap_or_default())]
    EmptyImage {
        /// The file, when the image came from one.
        source_name: Option<String>,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },

    /// An image is larger than the configured pixel budget (a decompression-bomb guard).
    #[error(
        "image{} is {width}x{height} = {pixels} pixels, over the limit of {limit} (see ImageLimits)",
        source_name.as_ref().map(|s| format!(" {s}")).unwrap_or_default(),
        pixels = u64::from(*width) * u64::from(*height)
    )]
    ImageTooLarge {
        /// The file, when the image came from one.
        source_name: Option<String>,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The pixel budget.
        limit: u64,
    },

    /// The prompt has a different number of image placeholders than images were given.
    #[error("{images} images given but the prompt has {placeholders} image placeholders")]
    ImageCount {
        /// Images attached to the messages.
        images: usize,
        /// Placeholders found in the rendered prompt.
        placeholders: usize,
    },

    /// The tokenizer could not be loaded or failed to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    Template(String),

    /// A model could not be fetched from the Hugging Face Hub or found in its local cache.
    #[error("model {repo}: {message}")]
    Hub {
        /// The repository id.
        repo: String,
        /// What went wrong and what to do.
        message: String,
    },

    /// A device could not be used (unknown name, backend not compiled in, driver missing).
    #[error("device: {0}")]
    Device(String),

    /// A benchmark file (JSONL) or an evaluation results file is malformed.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Benchmark {
        /// The file.
        path: PathBuf,
        /// The 1-based line, when the problem is on one line.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },

    /// A forward pass produced NaN or infinite values: broken weights, a degenerate configuration
    /// value that slipped through, or an overflow in a low-precision dtype.
    #[error("the {stage} produced non-finite values (NaN or infinity); check the weights and the configuration")]
    NonFinite {
        /// The first stage found non-finite (`"vision tower and projector"`, `"decoder logits"`).
        stage: &'static str,
    },

    /// The sequence would not fit in the model's context or the KV cache.
    #[error("sequence of {requested} tokens exceeds the limit of {limit} tokens")]
    ContextOverflow {
        /// Tokens the operation needs.
        requested: usize,
        /// Tokens available.
        limit: usize,
    },
}

fn weights_message(missing: &[String], unused: &[String]) -> String {
    fn list(names: &[String]) -> String {
        const SHOWN: usize = 20;
        let mut text = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
        if names.len() > SHOWN {
            text.push_str(&format!(", ... ({} more)", names.len() - SHOWN));
        }
        text
    }
    match (missing.is_empty(), unused.is_empty()) {
        (false, true) => format!("{} model parameters missing from the checkpoint: {}", missing.len(), list(missing)),
        (true, false) => format!("{} checkpoint tensors not used by the model: {}", unused.len(), list(unused)),
        _ => format!(
            "checkpoint does not match the model: {} parameters missing ({}); {} tensors unused ({})",
            missing.len(),
            list(missing),
            unused.len(),
            list(unused)
        ),
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config { path: path.into(), message: message.into() }
    }
}
