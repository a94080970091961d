//! NVIDIA's Nemotron 3 Nano Omni (`nemotron_h_omni`): a RADIO vision tower, pixel shuffle and an
//! RMSNorm relu² projector, and the hybrid Mamba-2 / attention / MoE Nemotron-H decoder.

pub mod config;
