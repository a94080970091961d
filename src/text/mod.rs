//! Language decoders.

pub mod decoder;
pub mod nemotron_h;

pub use decoder::{TextConfig, TextModel};
