//! Parity with transformers on the committed fixtures: each stage of each checkpoint layout
//! against reference activations written by `scripts/make_fixtures.py`.

mod common;

use burn::tensor::Tensor;
use common::{argmax_rows, model_dir, relative_error, Reference};
use vlm::loader::load_internvl;
use vlm::models::{InternVlModel, ModelInputs};

const TOLERANCE: f32 = 1e-4;

/// (checkpoint, reference weights) pairs.
const CASES: &[(&str, &str)] = &[
    ("internvl3-hf", "internvl3"),
    ("internvl3-original", "internvl3"),
    ("internvl3-hf-sharded", "internvl3"),
    ("internvl3-hf-bf16", "internvl3-bf16"),
    ("internvl2-llama-untied", "internvl2-llama-untied"),
    ("nvlm-d", "nvlm-d"),
];

fn load(checkpoint: &str) -> InternVlModel {
    let device = vlm::device::cpu();
    load_internvl(&model_dir(checkpoint), &device).unwrap_or_else(|e| panic!("{checkpoint}: {e}")).1
}

fn inputs(reference: &Reference, model: &InternVlModel) -> ModelInputs {
    ModelInputs {
        input_ids: reference.ids("input_ids"),
        pixel_values: Some(reference.tensor("pixel_values", &model.language_model.device())),
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
        let step = ModelInputs { input_ids: vec![vec![next]], pixel_values: None };
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

#[test]
fn every_layout_of_the_same_weights_gives_identical_logits() {
    let reference = Reference::load("internvl3");
    let logits: Vec<Vec<f32>> = ["internvl3-hf", "internvl3-original", "internvl3-hf-sharded"]
        .iter()
        .map(|checkpoint| {
            let model = load(checkpoint);
            let inputs = inputs(&reference, &model);
            let mut cache = model.new_cache(1, inputs.input_ids[0].len());
            model.forward(&inputs, &mut cache).unwrap().into_data().to_vec::<f32>().unwrap()
        })
        .collect();
    assert_eq!(logits[0], logits[1], "transformers vs OpenGVLab layout");
    assert_eq!(logits[0], logits[2], "single file vs shards");
}
