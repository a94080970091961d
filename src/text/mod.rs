//! Language decoders.

pub mod decoder;

pub use decoder::{TextConfig, TextModel};
