//! # vlm
//!
//! Vision-language model inference on [burn](https://burn.dev): a vision encoder, a cross-modal
//! projector and a language decoder, computing what HuggingFace transformers computes.
//!
//! Supported today: the InternVL family (InternVL 2 / 2.5 / 3, in both the OpenGVLab and the
//! transformers checkpoint layouts), NVIDIA's NVLM-D, Qwen2.5-VL and Qwen3-VL (NVIDIA's
//! Cosmos-Reason1 and Cosmos-Reason2), Pixtral-12B and LLaVA-1.5 (transformers' Llava layout), with
//! images and (Qwen-VL) videos. Models run on burn's CPU backend (flex) by default and on its CUDA
//! backend with the `cuda` feature.
//!
//! The crate has three layers, each usable alone:
//! - [`Vlm`]: `from_pretrained`, then `generate`, `stream` or `generate_batch`;
//! - [`Processor`] turns [`Message`]s into token ids and pixel values, and [`loader::load`] builds
//!   a [`models::Model`] (the enum of families) from a checkpoint directory;
//! - [`models::Model::forward`] takes token ids and pixels with a [`nn::KvCache`];
//! - the blocks ([`vision::InternVit`], [`projector::MultiModalProjector`], [`text::TextModel`])
//!   each follow `Config -> init -> forward`.
//!
//! [`eval`] scores models on benchmarks with the standard metrics.

pub mod config;
pub mod device;
pub mod error;
pub mod eval;
pub mod generation;
pub mod loader;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod processing;
pub mod projector;
pub mod text;
pub mod vision;

pub use burn::tensor::Device;
pub use error::{Error, Result};
pub use generation::{Generation, GenerationConfig, StopReason};
pub use loader::LoadOptions;
pub use nn::quant::QuantKind;
pub use pipeline::{TextStream, Vlm};
pub use processing::{Image, Message, Processor};
