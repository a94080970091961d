//! Parity with transformers on the committed fixtures: each stage of each checkpoint layout
//! against reference activations written by `scripts/make_fixtures.py`.

mod common;

use burn::tensor::Tensor;
use common::{Reference, argmax_rows, model_dir, relative_error};
use vlm::loader::load_internvl;
use vlm::models::{InternVlModel, ModelInputs, Pixels};

const TOLERANCE: f32 = 1e-4;

/// (checkpoint, reference weights) pairs.
const CASES: &[(&str, &str)] = &[
    ("internvl3-hf", "internvl3"),
    ("internvl3-original", "internvl3"),
    ("internvl3-hf-sharded", "internvl3"),
    ("internvl3-hf-bf16", "internvl3-bf16"),
    ("internvl2-llama-untied", "internvl2-llama-untied"),
    ("nvlm-d", "nvlm-d"),
    ("internvl2-internlm2", "internvl2-internlm2"),
    ("internvl-rope-linear", "internvl-rope-linear"),
    ("internvl-rope-dynamic", "internvl-rope-dynamic"),
    ("internvl-rope-llama3", "internvl-rope-llama3"),
    ("internvl-rope-yarn", "internvl-rope-yarn"),
];

fn load(checkpoint: &str) -> InternVlModel {
    let device = vlm::device::cpu();
    load_internvl(&model_dir(checkpoint), &device).unwrap_or_else(|e| panic!("{checkpoint}: {e}")).1
}

fn inputs(reference: &Reference, model: &InternVlModel) -> ModelInputs {
    ModelInputs {
        input_ids: reference.ids("input_ids"),
        pixels: Some(Pixels::Tiles(reference.tensor("pixel_values", &model.language_model.device()))),
    }
}

/// Greedy decoding of `steps` tokens with the KV cache: prefill the prompt, then one token at a time.
fn greedy(model: &InternVlModel, inputs: &ModelInputs, steps: usize) -> Vec<u32> {
    let prompt_len = inputs.input_ids[0].len();
    let mut cache = model.new_cache(1, prompt_len + steps);
    let mut logits = model.forward(inputs, &mut cache).unwrap();
    let mut tokens = Vec::new();
    for _ in 0..steps {
        let [_, len, vocab] = logits.dims();
        let last: Tensor<2> = logits.narrow(1, len - 1, 1).reshape([1, vocab]);
        let next = argmax_rows(last)[0];
        tokens.push(next);
        let step = ModelInputs { input_ids: vec![vec![next]], pixels: None };
        logits = model.forward(&step, &mut cache).unwrap();
    }
    tokens
}

#[test]
fn vision_tower_matches_transformers() {
    for &(checkpoint, weights) in CASES {
        let reference = Reference::load(weights);
        let model = load(checkpoint);
        let pixel_values = reference.tensor("pixel_values", &model.language_model.device());
        let hidden = model.vision_hidden_state(pixel_values).unwrap();
        let error = relative_error(hidden, &reference.floats("vision_hidden_state"));
        eprintln!("{checkpoint}: vision tower relative error {error:e}");
        assert!(error <= TOLERANCE, "{checkpoint}: vision tower relative error {error:e}");
    }
}

#[test]
fn projector_output_matches_transformers() {
    for &(checkpoint, weights) in CASES {
        let reference = Reference::load(weights);
        let model = load(checkpoint);
        let pixel_values = reference.tensor("pixel_values", &model.language_model.device());
        let features = model.image_features(pixel_values).unwrap();
        let error = relative_error(features, &reference.floats("image_features"));
        eprintln!("{checkpoint}: projector relative error {error:e}");
        assert!(error <= TOLERANCE, "{checkpoint}: projector relative error {error:e}");
    }
}

#[test]
fn logits_match_transformers() {
    for &(checkpoint, weights) in CASES {
        let reference = Reference::load(weights);
        let model = load(checkpoint);
        let inputs = inputs(&reference, &model);
        let mut cache = model.new_cache(1, inputs.input_ids[0].len());
        let logits = model.forward(&inputs, &mut cache).unwrap();
        let error = relative_error(logits, &reference.floats("logits"));
        eprintln!("{checkpoint}: logits relative error {error:e}");
        assert!(error <= TOLERANCE, "{checkpoint}: logits relative error {error:e}");
    }
}

#[test]
fn greedy_tokens_match_transformers_generate() {
    for &(checkpoint, weights) in CASES {
        let reference = Reference::load(weights);
        let model = load(checkpoint);
        let expected = reference.ids("greedy_tokens").concat();
        let tokens = greedy(&model, &inputs(&reference, &model), expected.len());
        assert_eq!(tokens, expected, "{checkpoint}");
    }
}

/// Each greedy step's logits with the KV cache against transformers' `generate` (where the
/// dynamic RoPE recomputes its frequencies at every step and cached keys keep theirs).
#[test]
fn every_cached_decode_step_matches_transformers() {
    for &(checkpoint, weights) in
        CASES.iter().filter(|(_, weights)| weights.starts_with("internvl-rope") || weights.contains("internlm2"))
    {
        let reference = Reference::load(weights);
        let model = load(checkpoint);
        let inputs = inputs(&reference, &model);
        let (shape, steps) = reference.floats("greedy_step_logits");
        let expected = reference.ids("greedy_tokens").concat();
        let [count, vocab] = [shape[0], shape[1]];
        let mut cache = model.new_cache(1, inputs.input_ids[0].len() + count);
        let mut logits = model.forward(&inputs, &mut cache).unwrap();
        let mut worst = 0f32;
        for (step, &token) in expected.iter().enumerate() {
            let [_, len, _] = logits.dims();
            let last = logits.narrow(1, len - 1, 1).reshape([vocab]).into_data().try_to_vec::<f32>().unwrap();
            let error = common::relative_error_of(&last, &steps[step * vocab..(step + 1) * vocab]);
            worst = worst.max(error);
            assert!(error <= TOLERANCE, "{checkpoint}: step {step} logits relative error {error:e}");
            let next = ModelInputs { input_ids: vec![vec![token]], pixels: None };
            logits = model.forward(&next, &mut cache).unwrap();
        }
        eprintln!("{checkpoint}: {count} cached decode steps, worst logits relative error {worst:e}");
    }
}

#[test]
fn every_layout_of_the_same_weights_gives_identical_logits() {
    let reference = Reference::load("internvl3");
    let logits: Vec<Vec<f32>> = ["internvl3-hf", "internvl3-original", "internvl3-hf-sharded"]
        .iter()
        .map(|checkpoint| {
            let model = load(checkpoint);
            let inputs = inputs(&reference, &model);
            let mut cache = model.new_cache(1, inputs.input_ids[0].len());
            model.forward(&inputs, &mut cache).unwrap().into_data().try_to_vec::<f32>().unwrap()
        })
        .collect();
    assert_eq!(logits[0], logits[1], "transformers vs OpenGVLab layout");
    assert_eq!(logits[0], logits[2], "single file vs shards");
}

#[test]
fn greedy_with_cache_matches_full_recompute() {
    let reference = Reference::load("nvlm-d");
    let model = load("nvlm-d");
    let inputs = inputs(&reference, &model);
    let cached = greedy(&model, &inputs, 8);
    // Without reuse: every step runs the whole sequence through a fresh cache.
    let mut ids = inputs.input_ids[0].clone();
    let mut recomputed = Vec::new();
    for _ in 0..8 {
        let step = ModelInputs { input_ids: vec![ids.clone()], pixels: inputs.pixels.clone() };
        let mut cache = model.new_cache(1, ids.len());
        let logits = model.forward(&step, &mut cache).unwrap();
        let [_, len, vocab] = logits.dims();
        let next = argmax_rows(logits.narrow(1, len - 1, 1).reshape([1, vocab]))[0];
        recomputed.push(next);
        ids.push(next);
    }
    assert_eq!(cached, recomputed);
}

#[test]
fn image_token_count_mismatch_is_a_typed_error() {
    let reference = Reference::load("internvl3");
    let model = load("internvl3-hf");
    let mut inputs = inputs(&reference, &model);
    let image_token = model.config().image_token_id.unwrap();
    let first = inputs.input_ids[0].iter().position(|&id| id == image_token).unwrap();
    inputs.input_ids[0].remove(first);
    let mut cache = model.new_cache(1, inputs.input_ids[0].len());
    match model.forward(&inputs, &mut cache) {
        Err(vlm::Error::InputMismatch { image_tokens, image_features }) => {
            assert_eq!((image_tokens, image_features), (31, 32));
        }
        other => panic!("expected InputMismatch, got {:?}", other.map(|t| t.dims())),
    }
    // Image tokens without pixel values are the same error.
    inputs.pixels = None;
    let mut cache = model.new_cache(1, inputs.input_ids[0].len());
    assert!(matches!(model.forward(&inputs, &mut cache), Err(vlm::Error::InputMismatch { image_features: 0, .. })));
}

#[test]
fn text_only_prompt_runs_without_images() {
    let model = load("internvl3-hf");
    let inputs = ModelInputs { input_ids: vec![vec![1, 2, 3, 4]], pixels: None };
    let mut cache = model.new_cache(1, 4);
    let vocab = model.config().text.vocab_size;
    assert_eq!(model.forward(&inputs, &mut cache).unwrap().dims(), [1, 4, vocab]);
}

#[test]
fn prompt_beyond_the_cache_is_a_context_error() {
    let model = load("internvl3-hf");
    let inputs = ModelInputs { input_ids: vec![vec![1, 2, 3, 4]], pixels: None };
    let mut cache = model.new_cache(1, 3);
    assert!(matches!(model.forward(&inputs, &mut cache), Err(vlm::Error::ContextOverflow { requested: 4, limit: 3 })));
}

#[test]
fn float16_checkpoint_loads_as_rounded_weights() {
    use half::f16;
    use safetensors::tensor::TensorView;
    // Re-save the f32 fixture as float16.
    let dir = tempfile::tempdir().unwrap();
    let source = model_dir("internvl3-hf");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let converted: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let halves = view
                .data()
                .chunks_exact(4)
                .flat_map(|b| f16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes())
                .collect();
            (name, view.shape().to_vec(), halves)
        })
        .collect();
    let views = converted.iter().map(|(name, shape, data)| {
        (name.clone(), TensorView::new(safetensors::Dtype::F16, shape.clone(), data).unwrap())
    });
    std::fs::write(dir.path().join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();

    let model = load_internvl(dir.path(), &vlm::device::cpu()).unwrap().1;
    let norm = model.language_model.norm.weight.val().into_data().try_to_vec::<f32>().unwrap();
    let original = file.tensor("language_model.model.norm.weight").unwrap();
    let expected: Vec<f32> = original
        .data()
        .chunks_exact(4)
        .map(|b| f16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_f32())
        .collect();
    assert_eq!(norm, expected);

    let reference = Reference::load("internvl3");
    let inputs = inputs(&reference, &model);
    let mut cache = model.new_cache(1, inputs.input_ids[0].len());
    let error = relative_error(model.forward(&inputs, &mut cache).unwrap(), &reference.floats("logits"));
    assert!(error < 1e-2, "float16 weights: logits relative error {error:e}");
}

#[test]
fn relative_error_fails_on_any_non_finite_value() {
    let expected = [1.0, -2.0, 0.5];
    assert_eq!(common::relative_error_of(&expected, &expected), 0.0);
    assert!((common::relative_error_of(&[1.0, -2.0, 0.6], &expected) - 0.05).abs() < 1e-6);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let error = common::relative_error_of(&[bad; 3], &expected);
        assert!(error > TOLERANCE, "all-{bad} output passed with error {error}");
        let error = common::relative_error_of(&[1.0, bad, 0.5], &expected);
        assert!(error > TOLERANCE, "one {bad} passed with error {error}");
        assert!(common::relative_error_of(&expected, &[bad; 3]) > TOLERANCE, "a {bad} reference passed");
    }
}
