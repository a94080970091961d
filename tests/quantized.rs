//! Weight-only quantization (`LoadOptions::quantize`): the decoder's linear layers in 8 or 4 bits.
//! Two checks: the quantized model computes what the f32 model computes with the same rounded
//! weights (exactly on the prompt; within the rounding of activations to 8 bits on decode steps,
//! as llama.cpp's kernels round them), and against transformers' f32 reference the logits stay
//! within each scheme's bound (the rounding's own error on these tiny random-weight models), the
//! argmax agreeing wherever the reference's top-1 / top-2 margin is clear.

mod common;

use burn::tensor::Tensor;
use common::{Reference, Scratch, argmax_rows, model_dir, relative_error, relative_error_of};
use vlm::models::{Model, ModelInputs, Pixels};
use vlm::nn::quant::PackedWeight;
use vlm::{LoadOptions, QuantKind};

/// (checkpoint, reference): a tied Qwen2 decoder, an untied Llama one, NVLM-D's bias-free MLP,
/// InternLM2's fused and interleaved q/k/v.
const CASES: &[(&str, &str)] = &[
    ("internvl3-hf", "internvl3"),
    ("internvl2-llama-untied", "internvl2-llama-untied"),
    ("nvlm-d", "nvlm-d"),
    ("internvl2-internlm2", "internvl2-internlm2"),
];

/// Bound on the decode steps' relative error from rounding activations to 8 bits (the packed
/// kernels' integer products) against the same rounded weights in f32.
const ACTIVATION_ROUNDING_BOUND: f32 = 5e-2;

/// The reference margin (top-1 minus top-2 logit) beyond which each scheme must pick
/// transformers' token.
fn clear_margin(kind: QuantKind) -> f32 {
    match kind {
        QuantKind::Q8 => 1.0,
        QuantKind::Q4 => 3.0,
    }
}

/// Bounds on the prompt logits' relative error against transformers' f32 model.
const Q8_BOUND: f32 = 5e-2;
const Q4_BOUND: f32 = 0.5;

fn load(dir: &std::path::Path, quantize: Option<QuantKind>) -> Model {
    let options = LoadOptions { quantize };
    vlm::loader::load_with(dir, &vlm::device::cpu(), &options).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).1
}

fn inputs(reference: &Reference, model: &Model) -> ModelInputs {
    ModelInputs {
        input_ids: reference.ids("input_ids"),
        pixels: Some(Pixels::Tiles(reference.tensor("pixel_values", &model.device()))),
    }
}

fn prompt_logits(model: &Model, inputs: &ModelInputs) -> Tensor<3> {
    model.forward(inputs, &mut model.new_cache(1, inputs.input_ids[0].len())).unwrap()
}

/// The logits of each decode step (batch 1: the packed kernels' path) feeding `tokens` after the
/// prompt, concatenated.
fn step_logits(model: &Model, inputs: &ModelInputs, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(1, inputs.input_ids[0].len() + tokens.len());
    model.forward(inputs, &mut cache).unwrap();
    let mut out = Vec::new();
    for &token in tokens {
        let logits = model.forward(&ModelInputs { input_ids: vec![vec![token]], pixels: None }, &mut cache).unwrap();
        out.extend(logits.into_data().try_to_vec::<f32>().unwrap());
    }
    out
}

fn greedy(model: &Model, inputs: &ModelInputs, steps: usize) -> Vec<u32> {
    let mut cache = model.new_cache(1, inputs.input_ids[0].len() + steps);
    let mut logits = model.forward(inputs, &mut cache).unwrap();
    let mut tokens = Vec::new();
    for _ in 0..steps {
        let [_, len, vocab] = logits.dims();
        let next = argmax_rows(logits.narrow(1, len - 1, 1).reshape([1, vocab]))[0];
        tokens.push(next);
        logits = model.forward(&ModelInputs { input_ids: vec![vec![next]], pixels: None }, &mut cache).unwrap();
    }
    tokens
}

/// Rounds a checkpoint weight `[d_output, d_input]` to the grid, in place.
fn round_to_grid(kind: QuantKind, shape: &[usize], values: &mut [f32]) {
    let (d_output, d_input) = (shape[0], shape[1]);
    let transposed: Vec<f32> =
        (0..d_input * d_output).map(|i| values[(i % d_output) * d_input + i / d_output]).collect();
    let rounded = PackedWeight::quantize(kind, &transposed, d_input, d_output).dequantize();
    for (i, value) in rounded.into_iter().enumerate() {
        values[(i % d_output) * d_input + i / d_output] = value;
    }
}

#[test]
fn a_quantized_model_computes_what_its_rounded_weights_compute() {
    // Untied output projections (a tied one is an 8-bit copy of embeddings the input still reads
    // in f32, which a rounded checkpoint cannot express).
    for (checkpoint, weights, layers) in [
        ("internvl2-llama-untied", "internvl2-llama-untied", "language_model.model.layers."),
        ("internvl2-internlm2", "internvl2-internlm2", "language_model.model.layers."),
    ] {
        let reference = Reference::load(weights);
        for kind in [QuantKind::Q8, QuantKind::Q4] {
            let rounded = Scratch::of(checkpoint);
            let names: Vec<String> = {
                let bytes = std::fs::read(rounded.path("model.safetensors")).unwrap();
                let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                file.names().into_iter().map(String::from).collect()
            };
            for name in names {
                let head = name == "language_model.lm_head.weight" || name == "language_model.output.weight";
                if name.starts_with(layers) && name.ends_with(".weight") && !name.contains("norm") || head {
                    let grid = if head { QuantKind::Q8 } else { kind };
                    rounded.edit_floats(&name, |shape, values| {
                        if shape.len() == 2 {
                            round_to_grid(grid, shape, values)
                        }
                    });
                }
            }
            let dense = load(rounded.dir.path(), None);
            let quantized = load(&model_dir(checkpoint), Some(kind));
            let inputs = inputs(&reference, &dense);
            // The prompt (dequantized weights, the backend's f32 matmul) exactly; each decode
            // step (the packed kernels, with activations rounded to 8 bits per block, as llama.cpp
            // does) within that rounding's error.
            let want = prompt_logits(&dense, &inputs).into_data().try_to_vec::<f32>().unwrap();
            let got = prompt_logits(&quantized, &inputs).into_data().try_to_vec::<f32>().unwrap();
            let prompt_error = relative_error_of(&got, &want);
            let tokens = greedy(&dense, &inputs, 8);
            let step_error =
                relative_error_of(&step_logits(&quantized, &inputs, &tokens), &step_logits(&dense, &inputs, &tokens));
            eprintln!(
                "{checkpoint} {kind:?}: quantized vs rounded-weight f32 logits relative error: prompt {prompt_error:e}, \
                 decode steps {step_error:e}"
            );
            assert!(prompt_error <= 1e-4, "{checkpoint} {kind:?}: prompt {prompt_error:e}");
            assert!(step_error <= ACTIVATION_ROUNDING_BOUND, "{checkpoint} {kind:?}: decode steps {step_error:e}");
        }
    }
}

#[test]
fn quantized_logits_stay_within_the_schemes_bounds_of_transformers() {
    for &(checkpoint, weights) in CASES {
        let reference = Reference::load(weights);
        let f32_bytes = load(&model_dir(checkpoint), None).parameter_bytes();
        for (kind, bound) in [(QuantKind::Q8, Q8_BOUND), (QuantKind::Q4, Q4_BOUND)] {
            let model = load(&model_dir(checkpoint), Some(kind));
            let inputs = inputs(&reference, &model);
            let error = relative_error(prompt_logits(&model, &inputs), &reference.floats("logits"));
            let bytes = model.parameter_bytes();
            eprintln!(
                "{checkpoint} {kind:?}: logits relative error {error:e} (bound {bound:e}); {bytes} bytes of parameters, f32 {f32_bytes}"
            );
            assert!(error <= bound, "{checkpoint} {kind:?}: logits relative error {error:e} over {bound:e}");
            // Teacher-forced on transformers' tokens: where its top-1 / top-2 margin is clear,
            // the argmax agrees.
            let tokens = reference.ids("greedy_tokens")[0].clone();
            let margins = common::reference_margins(weights);
            let steps = step_logits(&model, &inputs, &tokens);
            let vocab = steps.len() / tokens.len();
            let prompt = prompt_logits(&model, &inputs);
            let [_, len, _] = prompt.dims();
            let mut argmaxes = vec![argmax_rows(prompt.narrow(1, len - 1, 1).reshape([1, vocab]))[0]];
            argmaxes.extend(steps.chunks(vocab).map(vlm::generation::sampler::argmax));
            for (step, ((&got, &want), &margin)) in argmaxes.iter().zip(&tokens).zip(&margins).enumerate() {
                eprintln!("  step {step}: margin {margin:.3}, {got} vs {want}");
                if margin >= clear_margin(kind) {
                    assert_eq!(got, want, "{checkpoint} {kind:?} step {step} (reference margin {margin})");
                }
            }
        }
    }
}

#[test]
fn quantization_names_parse() {
    assert_eq!("q8".parse::<QuantKind>(), Ok(QuantKind::Q8));
    assert_eq!("Q4_0".parse::<QuantKind>(), Ok(QuantKind::Q4));
    assert!("q3".parse::<QuantKind>().is_err());
}
