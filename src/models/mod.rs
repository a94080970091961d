//! Complete models, one file per family. A family combines blocks from `vision`, `projector` and
//! `text`; everything specific to it lives in its file.

pub mod internvl;

pub use internvl::{InternVlConfig, InternVlModel, InternVlVariant, ModelInputs};
