//! The GPU path: burn's CubeCL backend through wgpu (WGSL), run on whatever adapter the machine
//! has; in CI, Mesa's software Vulkan driver (lavapipe). The same code as CUDA but for code
//! generation: fusion, autotune, the matmul / attention / reduction kernels. Against every
//! transformers fixture: prompt logits within the bound below (and the InternVL towers'
//! stages) and the greedy tokens of transformers' `generate`, through the whole library
//! (processor, model, cached and batched generation); f16; what decode steps compile; the
//! persisted autotune cache.
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

/// The checkpoints whose references hold conversations (`cases`), with their reference files.
const CASES: &[(&str, &str)] = &[
    ("qwen2_5-vl", "qwen2_5-vl"),
    ("qwen2_5-vl-tied", "qwen2_5-vl-tied"),
    ("qwen3-vl", "qwen3-vl"),
    ("pixtral", "pixtral"),
    ("llava", "llava"),
    ("llava-nobias", "llava-nobias"),
    ("nemotron-omni", "nemotron-omni"),
];

/// Every reference prompt of every conversation fixture, from the PNG files (and video frames)
/// on: input ids as transformers', prompt logits (or the last position's) of single prompts
/// within [`TOLERANCE`], and the greedy tokens of every row (batches left-padded, as the library
/// pads them).
#[test]
fn every_reference_prompt_matches_transformers_on_wgpu() {
    let device = device();
    for &(checkpoint, weights) in CASES {
        let started = std::time::Instant::now();
        let vlm = Vlm::from_dir(&model_dir(checkpoint), &device).unwrap_or_else(|e| panic!("{checkpoint}: {e}"));
        let description: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("reference/{weights}.json"))).unwrap(),
        )
        .unwrap();
        let reference = Reference::load(weights);
        for (name, case) in description["cases"].as_object().unwrap() {
            let key = |tensor: &str| format!("{name}.{tensor}");
            let conversations = common::case_conversations(case);
            if let [messages] = conversations.as_slice() {
                let encoding = vlm.encode(messages, &greedy()).unwrap();
                assert_eq!(encoding.input_ids, reference.ids(&key("input_ids"))[0], "{checkpoint} {name}: ids");
                let model = vlm.model();
                let mut cache = model.new_cache(1, encoding.input_ids.len());
                let logits = model.forward(&encoding.to_model_inputs(&device), &mut cache).unwrap();
                let error = if reference.has(&key("logits")) {
                    relative_error(logits, &reference.floats(&key("logits")))
                } else {
                    let [_, len, vocab] = logits.dims();
                    let last = logits.narrow(1, len - 1, 1).reshape([1, vocab]);
                    relative_error(last, &reference.floats(&key("last_logits")))
                };
                eprintln!("{checkpoint} {name}: prompt logits relative error {error:e}");
                assert!(error <= TOLERANCE, "{checkpoint} {name}: logits relative error {error:e}");
            }
            let outputs = vlm.generate_batch(&conversations, &greedy()).unwrap();
            let expected = reference.ids(&key("greedy_tokens"));
            for (row, output) in outputs.iter().enumerate() {
                assert_eq!(output.token_ids, expected[row], "{checkpoint} {name}: row {row} greedy tokens");
            }
            eprintln!("{checkpoint} {name}: greedy tokens of {} row(s) identical", outputs.len());
        }
        eprintln!("{checkpoint}: {:.1} s", started.elapsed().as_secs_f64());
    }
}

/// The InternVL-family references (prompt tensors rather than conversations) and the checkpoints
/// each one checks.
const INTERNVL: &[(&str, &[&str])] = &[
    ("internvl3", &["internvl3-hf", "internvl3-original"]),
    ("internvl3-bf16", &["internvl3-hf-bf16"]),
    ("internvl2-internlm2", &["internvl2-internlm2"]),
    ("internvl2-llama-untied", &["internvl2-llama-untied"]),
    ("nvlm-d", &["nvlm-d"]),
    ("internvl-rope-linear", &["internvl-rope-linear"]),
    ("internvl-rope-dynamic", &["internvl-rope-dynamic"]),
    ("internvl-rope-llama3", &["internvl-rope-llama3"]),
    ("internvl-rope-yarn", &["internvl-rope-yarn"]),
];

/// InternVL 2 / 2.5 / 3 in both layouts, NVLM-D, InternLM2 and every RoPE scaling: from the
/// reference processor's tiles, the vision tower's output, the projected features, the prompt
/// logits and a cached greedy decode.
#[test]
fn every_internvl_fixture_matches_transformers_on_wgpu() {
    let device = device();
    for &(weights, checkpoints) in INTERNVL {
        let reference = Reference::load(weights);
        for &checkpoint in checkpoints {
            let (_, model) = vlm::loader::load(&model_dir(checkpoint), &device).unwrap();
            let ids = reference.ids("input_ids");
            let tiles = reference.tensor::<4>("pixel_values", &device);
            let internvl = model.as_internvl().unwrap();
            for (stage, actual) in [
                ("vision_hidden_state", internvl.vision_hidden_state(tiles.clone()).unwrap()),
                ("image_features", internvl.image_features(tiles.clone()).unwrap()),
            ] {
                let error = relative_error(actual, &reference.floats(stage));
                eprintln!("{checkpoint}: {stage} relative error {error:e}");
                assert!(error <= TOLERANCE, "{checkpoint}: {stage} relative error {error:e}");
            }
            let pixels = Pixels::Tiles(tiles);
            let mut cache = model.new_cache(1, ids[0].len() + 8);
            let inputs = ModelInputs { input_ids: ids.clone(), pixels: Some(pixels) };
            let logits = model.forward(&inputs, &mut cache).unwrap();
            let error = relative_error(logits.clone(), &reference.floats("logits"));
            eprintln!("{checkpoint}: prompt logits relative error {error:e}");
            assert!(error <= TOLERANCE, "{checkpoint}: logits relative error {error:e}");
            let [_, len, vocab] = logits.dims();
            let mut last: Tensor<3> = logits.narrow(1, len - 1, 1);
            let mut tokens = Vec::new();
            for _ in 0..8 {
                let row = last.reshape([vocab]).into_data().try_to_vec::<f32>().unwrap();
                let token = vlm::generation::sampler::argmax(&row);
                tokens.push(token);
                last = model.forward(&ModelInputs { input_ids: vec![vec![token]], pixels: None }, &mut cache).unwrap();
            }
            assert_eq!(tokens, reference.ids("greedy_tokens")[0], "{checkpoint}: greedy tokens");
        }
    }
}

#[test]
fn an_unknown_device_name_is_a_device_error() {
    assert!(matches!(vlm::device::from_name("wgpu:7"), Err(vlm::Error::Device(_))));
}

/// One greedy generation on the Pixtral fixture: what [`a_warm_kernel_cache_runs_no_autotune`]
/// runs in fresh processes.
#[test]
#[ignore = "run by a_warm_kernel_cache_runs_no_autotune in a child process"]
fn child_generates_once() {
    let vlm = Vlm::from_dir(&model_dir("pixtral"), &device()).unwrap();
    let image = Image::open(fixtures().join("images/pixtral-200x120.png")).unwrap();
    let messages = [Message::user().image(image).text("What is in this image?")];
    vlm.generate(&messages, &greedy()).unwrap();
}

/// The autotune results persist in `VLM_KERNEL_CACHE`: a second process with the cache of the
/// first tunes nothing (counted in CubeCL's autotune log, not guessed from wall time).
#[test]
fn a_warm_kernel_cache_runs_no_autotune() {
    let cache = tempfile::tempdir().unwrap();
    let run = |log: &str| -> (usize, f64) {
        let log = cache.path().join(log);
        let started = std::time::Instant::now();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "child_generates_once", "--nocapture"])
            .env(vlm::device::KERNEL_CACHE_VAR, cache.path().join("kernels"))
            .env("CUBECL_DEBUG_LOG", &log)
            .status()
            .unwrap();
        assert!(status.success());
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.matches("Fastest result").count(), started.elapsed().as_secs_f64())
    };
    let (cold, cold_seconds) = run("cold.log");
    let (warm, warm_seconds) = run("warm.log");
    eprintln!("autotune runs: {cold} cold ({cold_seconds:.1} s), {warm} warm ({warm_seconds:.1} s)");
    assert!(cold > 0, "the cold run tuned nothing: is the autotune log written?");
    assert_eq!(warm, 0, "the warm run tuned {warm} kernels again");
}

/// Compilations and autotune runs CubeCL has logged so far (to `CUBECL_DEBUG_LOG`), once the
/// device is idle and the logger has drained.
fn logged_so_far(device: &Device) -> (usize, usize) {
    device.sync().unwrap();
    // CubeCL's logger writes (and flushes each line) from its own task: let it drain.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let text = std::fs::read_to_string(std::env::var("CUBECL_DEBUG_LOG").unwrap()).unwrap_or_default();
    (text.matches("[START_KERNEL_COMPILATION]").count(), text.matches("Fastest result").count())
}

/// A 64-token greedy generation on the InternVL3 fixture for `VLM_TEST_BATCH` conversations of
/// different lengths (left-padded when several), counting what tokens 4 to 64 compile and tune;
/// run by [`decode_steps_compile_and_tune_nothing_new`] in a fresh process with logging on.
#[test]
#[ignore = "run by decode_steps_compile_and_tune_nothing_new in a child process"]
fn child_decodes() {
    let batch: usize = std::env::var("VLM_TEST_BATCH").unwrap().parse().unwrap();
    let device = device();
    let vlm = Vlm::from_dir(&model_dir("internvl3-hf"), &device).unwrap();
    let image = Image::open(fixtures().join("images/wide.png")).unwrap();
    let config = greedy().max_new_tokens(64);
    let encodings: Vec<_> = (0..batch)
        .map(|row| {
            let messages = [Message::user().image(image.clone()).text("Describe it. ".repeat(row + 1))];
            vlm.encode(&messages, &config).unwrap()
        })
        .collect();
    let configs = vec![config; batch];
    let defaults = vlm::generation::GenerationDefaults::default();
    let tokenizer = vlm.processor().tokenizer();
    let started = std::time::Instant::now();
    let mut generator =
        vlm::generation::Generator::new(vlm.model(), tokenizer, &encodings, &configs, &defaults, started).unwrap();
    for _ in 0..3 {
        generator.step().unwrap();
    }
    let after_3 = logged_so_far(&device);
    let launches = vlm::device::LaunchCounter::start();
    while !generator.is_finished() {
        generator.step().unwrap();
    }
    let after_64 = logged_so_far(&device);
    let launches = launches.finish();
    assert_eq!(generator.generation(0).token_ids.len(), 64);
    let per_token = launches.launches as f64 / 61.0;
    eprintln!(
        "batch {batch}: (compilations, autotune runs) after 3 tokens {after_3:?}, after 64 {after_64:?}; \
         tokens 4..64 launched {per_token:.1} kernels per token, {} distinct",
        launches.distinct
    );
    assert!(
        launches.launches >= 61,
        "tokens 4..64 launched {} kernels: is the launch counter wired?",
        launches.launches
    );
    assert!(after_3.0 > 0, "no compilation logged: is CUBECL_DEBUG_LOG honoured?");
    assert_eq!(after_3, after_64, "batch {batch}: tokens 4..64 compiled or tuned something");
}

/// Decode steps keep their shapes: tokens 4 to 64 of a generation compile and autotune nothing
/// (counted in CubeCL's compilation and autotune logs, not guessed from wall time), at batch 1 and
/// at batch 4 with left padding.
#[test]
fn decode_steps_compile_and_tune_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    for batch in [1, 4] {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "child_decodes", "--nocapture"])
            .env(vlm::device::KERNEL_CACHE_VAR, "off")
            .env("CUBECL_DEBUG_LOG", dir.path().join(format!("batch-{batch}.log")))
            .env("VLM_TEST_BATCH", batch.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "batch {batch}: see the child's output above");
    }
}

/// Half precision on the GPU path (the closest stand-in here for bf16 on CUDA): weights load as
/// f16, every family's prompt logits stay within 2e-2 of transformers' f32 ones, and greedy tokens
/// equal transformers' while the reference's top-1 / top-2 margin is clear (at least 0.5; after a
/// closer call the two runs may part ways). Skipped, saying so, where the adapter has no f16.
#[test]
#[ignore = "run by half_precision_stays_close_to_transformers in a child process"]
fn child_half_precision() {
    let mut device = device();
    if !device.supports_dtype(burn::tensor::DType::F16) {
        eprintln!("this adapter has no f16 in shaders: skipped");
        return;
    }
    device.configure(burn::tensor::FloatDType::F16).unwrap();
    for (checkpoint, weights, name) in [
        ("qwen2_5-vl", "qwen2_5-vl", "single"),
        ("qwen3-vl", "qwen3-vl", "single"),
        ("pixtral", "pixtral", "single"),
        ("llava", "llava", "single"),
        ("nemotron-omni", "nemotron-omni", "single"),
    ] {
        if std::env::var("VLM_TEST_ONLY").is_ok_and(|only| only != checkpoint) {
            continue;
        }
        let vlm = Vlm::from_dir(&model_dir(checkpoint), &device).unwrap_or_else(|e| panic!("{checkpoint}: {e}"));
        let description: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("reference/{weights}.json"))).unwrap(),
        )
        .unwrap();
        let case = &description["cases"][name];
        let reference = Reference::load(weights);
        let messages = common::conversation(&case["messages"], None);
        let encoding = vlm.encode(&messages, &greedy()).unwrap();
        let model = vlm.model();
        let logits = model.forward(&encoding.to_model_inputs(&device), &mut model.new_cache(1, 256)).unwrap();
        let logits = logits.cast(burn::tensor::DType::F32);
        let error = relative_error(logits, &reference.floats(&format!("{name}.logits")));
        let tokens = vlm.generate(&messages, &greedy()).unwrap().token_ids;
        let expected = reference.ids(&format!("{name}.greedy_tokens"))[0].clone();
        let margins: Vec<f64> =
            case["greedy_margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        let checked = margins.iter().take_while(|&&margin| margin >= 0.5).count().min(expected.len());
        eprintln!(
            "{checkpoint} {name} in f16: prompt logits relative error {error:e}; first {checked} greedy tokens compared"
        );
        assert!(error <= 2e-2, "{checkpoint} {name}: f16 logits relative error {error:e}");
        assert_eq!(tokens[..checked], expected[..checked], "{checkpoint} {name}: f16 greedy tokens");
    }
}

#[test]
fn half_precision_stays_close_to_transformers() {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_half_precision", "--nocapture"])
        .status()
        .unwrap();
    assert!(status.success(), "see the child's output above");
}
