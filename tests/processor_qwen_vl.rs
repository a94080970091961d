//! The Qwen-VL processors against transformers' (`Qwen2VLImageProcessor`, the Qwen2.5-VL and
//! Qwen3-VL video processors): `smart_resize`, input ids (identical), pixel values (within one
//! 0-255 level), and end to end, from the PNG files through the chat template, the greedy tokens
//! of transformers' `generate` for every reference prompt (images, two images, a left-padded
//! batch, videos, an image with a video).

mod common;

use std::path::{Path, PathBuf};

use common::{Reference, model_dir};
use serde_json::Value;
use vlm::processing::{Image, Message, Video};
use vlm::{Error, GenerationConfig, Vlm};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(path)).unwrap()).unwrap()
}

fn vlm(checkpoint: &str) -> Vlm {
    Vlm::from_dir(&model_dir(checkpoint), &vlm::device::cpu()).unwrap_or_else(|e| panic!("{checkpoint}: {e}"))
}

fn numbers(value: &Value) -> Vec<u64> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

#[test]
fn smart_resize_matches_transformers() {
    let cases = json("processor/qwen-smart-resize.json");
    for case in cases["image"]["cases"].as_array().unwrap() {
        let args = numbers(&case["args"]);
        let got = vlm::processing::qwen_vl::smart_resize(args[0], args[1], args[2], args[3], args[4]);
        match case.get("result") {
            Some(result) => assert_eq!(got.unwrap(), (numbers(result)[0], numbers(result)[1]), "{args:?}"),
            None => assert!(matches!(got, Err(Error::Input(_))), "{args:?}: {got:?}"),
        }
    }
    for case in cases["qwen3_video"]["cases"].as_array().unwrap() {
        let a = numbers(&case["args"]);
        let got =
            vlm::processing::qwen_vl::smart_resize_clip(a[0] as usize, a[1], a[2], a[3] as usize, a[4], a[5], a[6]);
        match case.get("result") {
            Some(result) => assert_eq!(got.unwrap(), (numbers(result)[0], numbers(result)[1]), "{a:?}"),
            None => assert!(matches!(got, Err(Error::Input(_))), "{a:?}: {got:?}"),
        }
    }
}

/// Our normalised values back in 0-255 levels against the reference's levels: the largest gap.
fn level_gap(values: &[f32], levels: &[u8], width: usize, mean: [f32; 3], std: [f32; 3]) -> f32 {
    assert_eq!(values.len(), levels.len());
    let per_channel = width / 3;
    values
        .iter()
        .zip(levels)
        .enumerate()
        .map(|(i, (&v, &level))| {
            let c = (i % width) / per_channel;
            (v * std[c] * 255.0 + mean[c] * 255.0 - f32::from(level)).abs()
        })
        .fold(0.0, f32::max)
}

#[test]
fn images_become_the_reference_ids_and_patches() {
    let cases = json("processor/qwen-cases.json");
    for (family, checkpoint) in [("qwen2_5", "qwen2_5-vl"), ("qwen3", "qwen3-vl")] {
        let vlm = vlm(checkpoint);
        let processor = &cases["processors"][family];
        let (mean, std) = (processor["image_mean"].clone(), processor["image_std"].clone());
        let mean: [f32; 3] = serde_json::from_value(mean).unwrap();
        let std: [f32; 3] = serde_json::from_value(std).unwrap();
        for case in cases["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let image = Image::open(fixtures().join(case["image"].as_str().unwrap())).unwrap();
            let messages = [Message::user().image(image).text("Describe it.")];
            let encoding = vlm.encode(&messages, &GenerationConfig::default()).unwrap();
            let reference = Reference::load_file(&fixtures().join(case["file"].as_str().unwrap()));
            let ids: Vec<u32> = reference.ids(&format!("{family}.input_ids")).concat();
            assert_eq!(encoding.input_ids, ids, "{family} {name}: input ids");
            let (shape, levels) = reference.bytes(&format!("{family}.pixel_values_u8"));
            let gap = level_gap(&encoding.pixel_values, &levels, shape[1], mean, std);
            eprintln!("{family} {name}: pixel values within {gap:.3} levels of transformers'");
            assert!(gap <= 1.0 + 1e-3, "{family} {name}: pixel values differ by {gap} levels");
        }
    }
}

#[test]
fn every_reference_prompt_generates_transformers_greedy_tokens() {
    for (checkpoint, weights) in
        [("qwen2_5-vl", "qwen2_5-vl"), ("qwen2_5-vl-tied", "qwen2_5-vl-tied"), ("qwen3-vl", "qwen3-vl")]
    {
        let vlm = vlm(checkpoint);
        let description = json(&format!("reference/{weights}.json"));
        let reference = Reference::load(weights);
        for (name, case) in description["cases"].as_object().unwrap() {
            let conversations = common::case_conversations(case);
            let config = GenerationConfig::default().temperature(0.0).max_new_tokens(8).eos_token_ids(vec![]);
            let expected = reference.ids(&format!("{name}.input_ids"));
            for (row, conversation) in conversations.iter().enumerate() {
                let encoding = vlm.encode(conversation, &config).unwrap();
                let unpadded: Vec<u32> = expected[row].iter().copied().skip_while(|&id| id == 400).collect();
                assert_eq!(encoding.input_ids, unpadded, "{checkpoint} {name}: row {row} input ids");
            }
            let outputs = vlm.generate_batch(&conversations, &config).unwrap();
            let tokens = reference.ids(&format!("{name}.greedy_tokens"));
            for (row, output) in outputs.iter().enumerate() {
                assert_eq!(output.token_ids, tokens[row], "{checkpoint} {name}: row {row} greedy tokens");
            }
        }
    }
}

#[test]
fn bad_videos_and_budgets_are_typed_errors() {
    let frame = |w, h| Image::from_rgb8(w, h, vec![128; (w * h * 3) as usize]).unwrap();
    assert!(matches!(Video::from_frames(vec![frame(64, 64), frame(64, 48)], 2.0), Err(Error::Input(_))));
    // Qwen3-VL needs at least one whole temporal patch of frames.
    let vlm = vlm("qwen3-vl");
    let one = Video::from_frames(vec![frame(64, 64)], 2.0).unwrap();
    let error = vlm.encode(&[Message::user().video(one).text("?")], &GenerationConfig::default()).unwrap_err();
    assert!(matches!(&error, Error::Input(m) if m.contains("temporal patch")), "{error}");
    // A budget that cannot hold an image.
    let image = frame(64, 64);
    let config = GenerationConfig::default().min_pixels(5000).max_pixels(4000);
    let error = vlm.encode(&[Message::user().image(image.clone()).text("?")], &config).unwrap_err();
    assert!(matches!(error, Error::Input(_)), "{error}");
    // InternVL checkpoints take no videos.
    let internvl = self::vlm("internvl3-hf");
    let clip = Video::from_frames(vec![frame(64, 64); 2], 2.0).unwrap();
    let error = internvl.encode(&[Message::user().video(clip).text("?")], &GenerationConfig::default()).unwrap_err();
    assert!(matches!(error, Error::Input(_)), "{error}");
    // A placeholder count that differs from the images given.
    let error = vlm.encode(&[Message::user().text("<|image_pad|> what?")], &GenerationConfig::default()).unwrap_err();
    assert!(matches!(error, Error::ImageCount { .. } | Error::InputMismatch { .. }), "{error}");
}
