//! Vision encoders.

pub mod intern_vit;
pub mod qwen_grid;
pub mod qwen_vit;

pub use intern_vit::{InternVit, InternVitConfig};
pub use qwen_vit::{QwenVisionConfig, QwenVisionTransformer};
