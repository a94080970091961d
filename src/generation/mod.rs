//! Text generation over a model's forward: sampling settings, logits processing, the decode
//! loop over a preallocated KV cache, and UTF-8-safe streaming with stop strings.

pub mod config;
pub mod detokenizer;
pub mod generate;
pub mod sampler;

pub use config::{GenerationConfig, GenerationDefaults};
pub use detokenizer::{IncrementalDecoder, StopStrings};
pub use generate::{Generation, Generator, StopReason, Timings};
pub use sampler::{Sampler, Sampling};
