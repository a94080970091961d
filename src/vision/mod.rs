//! Vision encoders.

pub mod clip;
pub mod intern_vit;
pub mod pixtral;
pub mod qwen_grid;
pub mod qwen_vit;
pub mod radio;

pub use clip::{ClipVision, ClipVisionConfig};
pub use intern_vit::{InternVit, InternVitConfig};
pub use pixtral::{PixtralVision, PixtralVisionConfig};
pub use qwen_vit::{QwenVisionConfig, QwenVisionTransformer};
pub use radio::{RadioVision, RadioVisionConfig};
