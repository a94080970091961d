//! Parity of Nemotron 3 Nano Omni with transformers (`NemotronH_Omni_Reasoning_V3`) on the
//! committed fixture (`scripts/fixtures_nemotron.py`, group `nemotron_omni`): a 3-block RADIO
//! tower with CLS and register tokens, layer scales and a 6x6 position table (resized up and
//! down), the pixel shuffle, the RMSNorm / relu² projector, and the Nemotron-H decoder. Checked:
//! every tower hidden state, the features, the shuffled tokens, the projected features, the prompt
//! logits and every cached greedy step, for one image and for two images of different grids; the
//! processor's grids, pixels and ids, and end to end the greedy tokens of `generate`.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use common::{Case, Reference, model_dir, relative_error_of};
use serde_json::Value;
use vlm::models::{ModelInputs, NemotronOmniModel, PatchGrid, Pixels};
use vlm::processing::{Image, Message, ProcessOptions};
use vlm::vision::qwen_grid::VisualGrid;
use vlm::{Error, GenerationConfig, Vlm};

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn description() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference/nemotron-omni.json")).unwrap()).unwrap()
}

fn load() -> NemotronOmniModel {
    let (_, model) = vlm::loader::load(&model_dir("nemotron-omni"), &vlm::device::cpu()).unwrap();
    match model {
        vlm::models::Model::NemotronOmni(model) => model,
        other => panic!("loaded as {other:?}"),
    }
}

/// The reference processor's pixels and grids as the model takes them.
fn pixels(case: &Case, model: &NemotronOmniModel) -> (Pixels, Vec<(usize, usize)>) {
    let (shape, values) = case.floats("pixel_values");
    let (_, grids) = case.ints("image_grid_hw");
    let grids: Vec<(usize, usize)> = grids.chunks(2).map(|g| (g[0] as usize, g[1] as usize)).collect();
    let device = model.language_model.device();
    let values = Tensor::from_data(TensorData::new(values, [shape[0], shape[1]]), &device);
    let visuals = grids
        .iter()
        .map(|&(h, w)| PatchGrid { grid: VisualGrid { t: 1, h, w }, video_seconds_per_patch: None })
        .collect();
    (Pixels::Patches { values, visuals }, grids)
}

fn flat<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().try_to_vec::<f32>().unwrap()
}

fn check(label: &str, actual: Vec<f32>, expected: &[f32]) {
    let error = relative_error_of(&actual, expected);
    eprintln!("{label}: relative error {error:e}");
    assert!(error <= TOLERANCE, "{label}: relative error {error:e}");
}

#[test]
fn every_vision_stage_matches_transformers() {
    let model = load();
    let reference = Reference::load("nemotron-omni");
    for name in ["single", "two_images"] {
        let case = Case { reference: &reference, name };
        let (pixels, grids) = pixels(&case, &model);
        let Pixels::Patches { values, .. } = &pixels else { unreachable!() };
        let tower = &model.vision_model;
        let states = tower.hidden_states(values.clone(), &grids, tower.blocks.len()).unwrap();
        let (shape, expected) = case.floats("vision_hidden_states"); // [layers + 1, 1, S, C]
        let per_state = expected.len() / shape[0];
        for (i, state) in states.into_iter().enumerate() {
            check(&format!("{name}: tower hidden state {i}"), flat(state), &expected[i * per_state..][..per_state]);
        }
        check(
            &format!("{name}: features"),
            flat(tower.features(values.clone(), &grids).unwrap()),
            &case.floats("vision_features").1,
        );
        check(
            &format!("{name}: shuffled"),
            flat(model.shuffled_features(&pixels).unwrap()),
            &case.floats("vision_shuffled").1,
        );
        check(
            &format!("{name}: image features"),
            flat(model.image_features(&pixels).unwrap()),
            &case.floats("image_features").1,
        );
    }
}

#[test]
fn logits_and_every_cached_greedy_step_match_transformers() {
    let model = load();
    let reference = Reference::load("nemotron-omni");
    for name in ["single", "two_images"] {
        let case = Case { reference: &reference, name };
        let (pixels, _) = pixels(&case, &model);
        if !case.has("logits") {
            // Only the last position is stored for this prompt.
            let mut cache = model.new_cache(1, 128);
            let inputs = ModelInputs { input_ids: case.ids("input_ids"), pixels: Some(pixels.clone()) };
            let logits = model.logits(model.hidden_states(&inputs, &mut cache).unwrap());
            let [_, len, vocab] = logits.dims();
            let last = flat(logits.narrow(1, len - 1, 1).reshape([1, vocab]));
            check(&format!("{name}: last prompt logits"), last, &case.floats("last_logits").1);
        }
        common::check_logits_and_greedy_steps(
            "nemotron-omni",
            &case,
            Some(pixels),
            TOLERANCE,
            |batch, capacity| model.new_cache(batch, capacity),
            |inputs, cache| model.logits(model.hidden_states(inputs, cache).unwrap()),
        );
    }
}

/// 8-bit decoder weights (the tower and projector stay f32): the prompt logits stay within the
/// bound `tests/quantized.rs` holds the other families to.
#[test]
fn an_8_bit_decoder_stays_close_to_transformers() {
    let options = vlm::LoadOptions { quantize: Some(vlm::QuantKind::Q8) };
    let (_, model) = vlm::loader::load_with(&model_dir("nemotron-omni"), &vlm::device::cpu(), &options).unwrap();
    let vlm::models::Model::NemotronOmni(model) = model else { panic!("not a Nemotron Omni model") };
    assert!(model.config().text.quantization.is_some());
    let reference = Reference::load("nemotron-omni");
    let case = Case { reference: &reference, name: "single" };
    let (pixels, _) = pixels(&case, &model);
    let inputs = ModelInputs { input_ids: case.ids("input_ids"), pixels: Some(pixels) };
    let logits = model.logits(model.hidden_states(&inputs, &mut model.new_cache(1, 64)).unwrap());
    let error = relative_error_of(&flat(logits), &case.floats("logits").1);
    eprintln!("q8: prompt logits relative error {error:e}");
    assert!(error <= 5e-2, "q8: prompt logits relative error {error:e}");
}

/// Pixel values (normalised, not whole levels) against the reference's, in 0-255 levels.
fn level_gap(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    // The largest std (0.2758) x 255: one normalised unit is at most this many levels.
    ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) * 0.2758 * 255.0
}

#[test]
fn the_processor_gives_the_reference_grids_pixels_and_ids() {
    let vlm = Vlm::from_dir(&model_dir("nemotron-omni"), &vlm::device::cpu()).unwrap();
    let description = description();
    let reference = Reference::load("nemotron-omni");
    let config = GenerationConfig::default().temperature(0.0).max_new_tokens(8).eos_token_ids(vec![]);
    for (name, case) in description["cases"].as_object().unwrap() {
        let messages = common::conversation(&case["messages"], None);
        let rendered = vlm.processor().render(&messages, true).unwrap();
        assert_eq!(rendered, case["prompt"].as_str().unwrap(), "{name}: rendered template");
        let encoding = vlm.encode(&messages, &config).unwrap();
        assert_eq!(encoding.input_ids, reference.ids(&format!("{name}.input_ids"))[0], "{name}: input ids");
        let gap = level_gap(&encoding.pixel_values, &reference.floats(&format!("{name}.pixel_values")).1);
        eprintln!("{name}: pixel values within {gap:.2e} levels of transformers'");
        assert!(gap <= 0.01, "{name}: pixel values differ by {gap} levels");
        let output = vlm.generate(&messages, &config).unwrap();
        assert_eq!(output.token_ids, reference.ids(&format!("{name}.greedy_tokens"))[0], "{name}: greedy tokens");
    }
    // Images alone: a tiny one scaled up to the minimum, a wide one, one with alpha.
    for case in description["processor"]["processor_only_cases"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let image = Image::open(fixtures().join(case["image"].as_str().unwrap())).unwrap();
        let encoding = vlm.encode(&[Message::user().image(image).text("?")], &config).unwrap();
        let (_, grid) = reference.ints(&format!("{name}.image_grid_hw"));
        let vlm::processing::Visual::Patches { grid: ours, .. } = encoding.visuals[0] else { panic!("{name}") };
        assert_eq!([ours.h as i64, ours.w as i64], grid[..], "{name}: grid");
        let gap = level_gap(&encoding.pixel_values, &reference.floats(&format!("{name}.pixel_values")).1);
        eprintln!("{name}: pixel values within {gap:.2e} levels of transformers'");
        assert!(gap <= 0.01, "{name}: pixel values differ by {gap} levels");
    }
}

#[test]
fn grids_follow_transformers_rule_at_fixture_and_published_settings() {
    let description = description();
    let vlm = Vlm::from_dir(&model_dir("nemotron-omni"), &vlm::device::cpu()).unwrap();
    let vlm::processing::ImageProcessor::NemotronOmni(images) = vlm.processor().images() else { panic!() };
    let mut published = images.clone();
    published.min_num_patches = 1024;
    published.max_num_patches = Some(13_312);
    for (rule, images) in [("grid_rule_fixture", images), ("grid_rule_real", &published)] {
        let budget = images.budget(1, &ProcessOptions::default());
        assert_eq!(budget as u64, description["processor"][rule]["per_image_budget"].as_u64().unwrap(), "{rule}");
        for size in description["processor"][rule]["sizes"].as_array().unwrap() {
            let (w, h) = (size["width"].as_u64().unwrap() as usize, size["height"].as_u64().unwrap() as usize);
            let grid = images.grid(h, w, budget, images.min_num_patches);
            let Some(want) = size["grid_hw"].as_array() else {
                // transformers divides by zero here; this is an input error.
                assert!(matches!(grid, Err(Error::Input(_))), "{rule}: {w}x{h} gave {grid:?}");
                continue;
            };
            let want = (want[0].as_u64().unwrap() as usize, want[1].as_u64().unwrap() as usize);
            assert_eq!(grid.unwrap(), want, "{rule}: {w}x{h}");
        }
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let vlm = Vlm::from_dir(&model_dir("nemotron-omni"), &vlm::device::cpu()).unwrap();
    let config = GenerationConfig::default();
    // Image tokens typed in the text.
    let error = vlm.encode(&[Message::user().text("<image> what?")], &config).unwrap_err();
    assert!(matches!(error, Error::ImageCount { .. } | Error::InputMismatch { .. }), "{error}");
    // No audio: its placeholders would otherwise reach the decoder as text.
    let error =
        vlm.encode(&[Message::user().text("Transcribe <so_start><so_embedding><so_end>")], &config).unwrap_err();
    assert!(matches!(&error, Error::Input(message) if message.contains("audio")), "{error}");
    // No videos (yet).
    let frame = Image::from_rgb8(32, 32, vec![1; 32 * 32 * 3]).unwrap();
    let clip = vlm::processing::Video::from_frames(vec![frame; 2], 2.0).unwrap();
    let error = vlm.encode(&[Message::user().video(clip).text("?")], &config).unwrap_err();
    assert!(matches!(error, Error::Input(_)), "{error}");
    // An image so elongated one side shrinks to nothing within the budget.
    let sliver = Image::from_rgb8(4000, 1, vec![7; 12_000]).unwrap();
    let error = vlm.encode(&[Message::user().image(sliver).text("?")], &config).unwrap_err();
    assert!(matches!(error, Error::Input(_)), "{error}");
}
