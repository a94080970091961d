//! Parity of the Llava layout with transformers on the committed fixtures
//! (`scripts/fixtures_llava.py`): Pixtral-12B's shape (Pixtral tower on a Mistral decoder with an
//! explicit head_dim, in transformers 4 and 5 files) and LLaVA-1.5's (CLIP tower on Llama, with
//! the `default` strategy, and a bias-free projector reading two layers under `full`). Checked:
//! the tower's selected hidden states, the projected features, the prompt logits, and every cached
//! greedy step, for one image, two images of different sizes, and a left-padded batch.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::{Case, Reference, model_dir, relative_error_of};
use vlm::models::{LlavaModel, ModelInputs, Pixels};
use vlm::processing::Normalization;

const TOLERANCE: f32 = 1e-4;

/// (checkpoint, reference weights, cases).
const CASES: &[(&str, &str, &[&str])] = &[
    ("pixtral", "pixtral", &["single", "two_images"]),
    ("pixtral-hf5", "pixtral", &["single", "two_images"]),
    ("llava", "llava", &["single", "batch"]),
    ("llava-nobias", "llava-nobias", &["single", "batch"]),
];

fn load(checkpoint: &str) -> LlavaModel {
    let (_, model) =
        vlm::loader::load(&model_dir(checkpoint), &vlm::device::cpu()).unwrap_or_else(|e| panic!("{checkpoint}: {e}"));
    match model {
        vlm::models::Model::Llava(model) => model,
        other => panic!("{checkpoint} loaded as {other:?}"),
    }
}

/// The pixels of a reference case as the Llava model takes them.
trait LlavaPixels {
    fn pixels(&self, model: &LlavaModel) -> Pixels;
}

impl LlavaPixels for Case<'_> {
    /// The processor's pixels as the model takes them: transformers' fused normalisation of the
    /// reference levels; Pixtral's images cut out of their zero padding by `image_sizes`.
    fn pixels(&self, model: &LlavaModel) -> Pixels {
        let Normalization { mean, std, .. } = Normalization::OPENAI_CLIP;
        let (shape, levels) = self.reference.bytes(&self.key("pixel_values_u8"));
        let [images, _, height, width] = [shape[0], shape[1], shape[2], shape[3]];
        let device = model.language_model.device();
        let level = |i: usize, c: usize, y: usize, x: usize| {
            let level = levels[((i * 3 + c) * height + y) * width + x];
            (f32::from(level) - mean[c] * 255.0) / (std[c] * 255.0)
        };
        if !self.has("image_sizes") {
            let values: Vec<f32> = (0..images)
                .flat_map(|i| {
                    (0..3).flat_map(move |c| (0..height).flat_map(move |y| (0..width).map(move |x| (i, c, y, x))))
                })
                .map(|(i, c, y, x)| level(i, c, y, x))
                .collect();
            return Pixels::Tiles(Tensor::from_data(TensorData::new(values, [images, 3, height, width]), &device));
        }
        let (_, sizes) = self.reference.ints(&self.key("image_sizes"));
        let images = sizes
            .chunks(2)
            .enumerate()
            .map(|(i, hw)| {
                let (h, w) = (hw[0] as usize, hw[1] as usize);
                let values: Vec<f32> = (0..3)
                    .flat_map(|c| (0..h).flat_map(move |y| (0..w).map(move |x| (c, y, x))))
                    .map(|(c, y, x)| level(i, c, y, x))
                    .collect();
                Tensor::from_data(TensorData::new(values, [3, h, w]), &device)
            })
            .collect();
        Pixels::Images(images)
    }
}

fn cases() -> impl Iterator<Item = (&'static str, LlavaModel, Reference, &'static str)> {
    CASES.iter().flat_map(|&(checkpoint, weights, names)| {
        names.iter().map(move |&name| (checkpoint, load(checkpoint), Reference::load(weights), name))
    })
}

#[test]
fn selected_vision_features_and_projected_features_match_transformers() {
    for (checkpoint, model, reference, name) in cases() {
        let case = Case { reference: &reference, name };
        let pixels = case.pixels(&model);
        // Compared flat: transformers keeps CLIP's features per image, `[images, tokens, width]`.
        let flat = |tensor: Tensor<2>| tensor.into_data().try_to_vec::<f32>().unwrap();
        let selected = Tensor::cat(model.selected_features(&pixels).unwrap(), 0);
        let error = relative_error_of(&flat(selected), &case.floats("vision_selected").1);
        eprintln!("{checkpoint} {name}: selected vision hidden states relative error {error:e}");
        assert!(error <= TOLERANCE, "{checkpoint} {name}: selected vision features relative error {error:e}");
        let features = model.image_features(&pixels).unwrap();
        let error = relative_error_of(&flat(features), &case.floats("image_features").1);
        eprintln!("{checkpoint} {name}: image features relative error {error:e}");
        assert!(error <= TOLERANCE, "{checkpoint} {name}: image features relative error {error:e}");
    }
}

#[test]
fn logits_and_every_cached_greedy_step_match_transformers() {
    for (checkpoint, model, reference, name) in cases() {
        check_logits_and_greedy_steps(checkpoint, &model, &Case { reference: &reference, name });
    }
}

/// Mistral's sliding window (4096 by default): the pixtral checkpoint with a window of a few
/// tokens, so the prompts and every decode step see only their last tokens.
#[test]
fn a_sliding_window_decoder_matches_transformers() {
    let description: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir("../reference/pixtral-sliding.json")).unwrap())
            .unwrap();
    let window = description["sliding_window"].as_u64().unwrap();
    let copy = common::Scratch::of("pixtral");
    copy.edit_json("config.json", |json| json["text_config"]["sliding_window"] = window.into());
    let (config, model) = vlm::loader::load(copy.dir.path(), &vlm::device::cpu()).unwrap();
    assert_eq!(config.text().unwrap().sliding_window, Some(window as usize));
    let vlm::models::Model::Llava(model) = model else { panic!("not a Llava model") };
    let reference = Reference::load("pixtral-sliding");
    for name in ["single", "two_images"] {
        check_logits_and_greedy_steps("pixtral (window)", &model, &Case { reference: &reference, name });
    }
}

/// transformers 5 nesting, sharded as `save_pretrained` shards big checkpoints.
#[test]
fn a_sharded_checkpoint_loads_the_same_weights() {
    let copy = common::Scratch::of("pixtral-hf5");
    copy.shard(3);
    let (_, model) = vlm::loader::load(copy.dir.path(), &vlm::device::cpu()).unwrap();
    let vlm::models::Model::Llava(model) = model else { panic!("not a Llava model") };
    let reference = Reference::load("pixtral");
    check_logits_and_greedy_steps("pixtral-hf5 (3 shards)", &model, &Case { reference: &reference, name: "single" });
}

fn check_logits_and_greedy_steps(label: &str, model: &LlavaModel, case: &Case) {
    common::check_logits_and_greedy_steps(
        label,
        case,
        Some(case.pixels(model)),
        TOLERANCE,
        |batch, capacity| model.new_cache(batch, capacity),
        |inputs, cache| model.logits(model.hidden_states(inputs, cache).unwrap()),
    );
}

#[test]
fn fewer_image_tokens_than_features_is_an_input_mismatch() {
    let model = load("llava");
    let reference = Reference::load("llava");
    let case = Case { reference: &reference, name: "single" };
    let mut ids = case.ids("input_ids");
    let at = ids[0].iter().position(|&id| id == 480).unwrap();
    ids[0][at] = 1;
    let inputs = ModelInputs { input_ids: ids, pixels: Some(case.pixels(&model)) };
    let error = model.hidden_states(&inputs, &mut model.new_cache(1, 64)).unwrap_err();
    assert!(matches!(error, vlm::Error::InputMismatch { image_tokens: 35, image_features: 36 }), "{error}");
}
