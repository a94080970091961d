//! Vision encoders.

pub mod intern_vit;

pub use intern_vit::{InternVit, InternVitConfig};
