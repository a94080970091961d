//! The GPU path: burn's CubeCL backend through wgpu (WGSL), run on whatever adapter the machine
//! has; in CI, Mesa's software Vulkan driver (lavapipe). The same code as CUDA but for code
//! generation: fusion, autotune, the matmul / attention / reduction kernels. Against the
//! transformers fixtures, per family: prompt logits within the bound below and the greedy tokens of
//! transformers' `generate`, through the whole library (processor, model, cached generation).
//!
//! Run with `cargo test --features wgpu --test wgpu` (CI sets `CUBECL_AUTOTUNE_LEVEL=minimal`: the
//! autotune runs are most of the start-up on a software GPU).

#![cfg(feature = "wgpu")]

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use common::{Reference, model_dir, relative_error};
use serde_json::Value;
use vlm::models::{ModelInputs, Pixels};
use vlm::processing::{Image, Message};
use vlm::{GenerationConfig, Vlm};

/// Prompt logits against transformers' f32 CPU logits. lavapipe runs f32 arithmetic, but its
/// kernels sum in other orders than the CPU's (tiled matmuls, fused reductions).
const TOLERANCE: f32 = 1e-4;

fn device() -> Device {
    vlm::device::from_name("wgpu").unwrap_or_else(|e| panic!("{e}"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn greedy() -> GenerationConfig {
    GenerationConfig::default().temperature(0.0).max_new_tokens(8).eos_token_ids(vec![])
}

/// The messages of a reference conversation, images read from the fixtures.
fn conversation(messages: &Value) -> Vec<Message> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|message| {
            let mut out = match message["role"].as_str().unwrap() {
                "system" => Message::system(),
                "assistant" => Message::assistant(),
                _ => Message::user(),
            };
            match &message["content"] {
                Value::String(text) => out = out.text(text),
                Value::Array(parts) => {
                    for part in parts {
                        out = match part["type"].as_str().unwrap() {
                            "text" => out.text(part.get("text").or(part.get("content")).unwrap().as_str().unwrap()),
                            "image" => out.image(
                                Image::open(fixtures().join("images").join(part["image"].as_str().unwrap())).unwrap(),
                            ),
                            other => panic!("part type {other}"),
                        };
                    }
                }
                other => panic!("content {other}"),
            }
            out
        })
        .collect()
}

/// One reference prompt of a family, from the PNG files on: input ids as transformers', prompt
/// logits (or the last position's) within [`TOLERANCE`], and the 8 greedy tokens.
fn check_case(checkpoint: &str, weights: &str, name: &str) {
    let started = std::time::Instant::now();
    let device = device();
    let vlm = Vlm::from_dir(&model_dir(checkpoint), &device).unwrap_or_else(|e| panic!("{checkpoint}: {e}"));
    let description: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("reference/{weights}.json"))).unwrap())
            .unwrap();
    let reference = Reference::load(weights);
    let messages = conversation(&description["cases"][name]["messages"]);
    let encoding = vlm.encode(&messages, &greedy()).unwrap();
    assert_eq!(encoding.input_ids, reference.ids(&format!("{name}.input_ids"))[0], "{checkpoint} {name}: ids");
    let model = vlm.model();
    let mut cache = model.new_cache(1, encoding.input_ids.len());
    let logits = model.forward(&encoding.to_model_inputs(&device), &mut cache).unwrap();
    let key = |tensor: &str| format!("{name}.{tensor}");
    let error = if reference.has(&key("logits")) {
        relative_error(logits, &reference.floats(&key("logits")))
    } else {
        let [_, len, vocab] = logits.dims();
        relative_error(logits.narrow(1, len - 1, 1).reshape([1, vocab]), &reference.floats(&key("last_logits")))
    };
    eprintln!("{checkpoint} {name}: prompt logits relative error {error:e} on {}", device_name());
    assert!(error <= TOLERANCE, "{checkpoint} {name}: logits relative error {error:e}");
    let output = vlm.generate(&messages, &greedy()).unwrap();
    assert_eq!(output.token_ids, reference.ids(&key("greedy_tokens"))[0], "{checkpoint} {name}: greedy tokens");
    eprintln!("{checkpoint} {name}: greedy tokens identical ({:.1} s)", started.elapsed().as_secs_f64());
}

fn device_name() -> String {
    format!("{:?}", device())
}

#[test]
fn an_unknown_device_name_is_a_device_error() {
    assert!(matches!(vlm::device::from_name("wgpu:7"), Err(vlm::Error::Device(_))));
}

/// InternVL3 (transformers layout): tiles of the reference processor, logits and a cached greedy
/// decode.
#[test]
fn internvl3_matches_transformers_on_wgpu() {
    let device = device();
    let (_, model) = vlm::loader::load(&model_dir("internvl3-hf"), &device).unwrap();
    let reference = Reference::load("internvl3");
    let ids = reference.ids("input_ids");
    let pixels = Pixels::Tiles(reference.tensor::<4>("pixel_values", &device));
    let mut cache = model.new_cache(1, ids[0].len() + 8);
    let logits = model.forward(&ModelInputs { input_ids: ids.clone(), pixels: Some(pixels) }, &mut cache).unwrap();
    let error = relative_error(logits.clone(), &reference.floats("logits"));
    eprintln!("internvl3-hf: prompt logits relative error {error:e}");
    assert!(error <= TOLERANCE, "internvl3-hf: logits relative error {error:e}");
    let [_, len, vocab] = logits.dims();
    let mut last: Tensor<3> = logits.narrow(1, len - 1, 1);
    let mut tokens = Vec::new();
    for _ in 0..8 {
        let row = last.reshape([vocab]).into_data().try_to_vec::<f32>().unwrap();
        let token = vlm::generation::sampler::argmax(&row);
        tokens.push(token);
        last = model.forward(&ModelInputs { input_ids: vec![vec![token]], pixels: None }, &mut cache).unwrap();
    }
    assert_eq!(tokens, reference.ids("greedy_tokens")[0], "internvl3-hf: greedy tokens");
}

#[test]
fn qwen2_5_vl_matches_transformers_on_wgpu() {
    check_case("qwen2_5-vl", "qwen2_5-vl", "single");
}

#[test]
fn qwen3_vl_matches_transformers_on_wgpu() {
    check_case("qwen3-vl", "qwen3-vl", "single");
}

#[test]
fn pixtral_matches_transformers_on_wgpu() {
    check_case("pixtral", "pixtral", "single");
}

#[test]
fn llava_matches_transformers_on_wgpu() {
    check_case("llava", "llava", "single");
}

#[test]
fn nemotron_omni_matches_transformers_on_wgpu() {
    check_case("nemotron-omni", "nemotron-omni", "two_images");
}
