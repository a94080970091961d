//! The Pixtral and LLaVA-1.5 processors against transformers' (`PixtralProcessor`,
//! `LlavaProcessor` with `CLIPImageProcessor`): chat templates (Pixtral's BOS from the template,
//! LLaVA's from the tokenizer), input ids (identical), pixel values (within one 0-255 level), and
//! end to end, from the PNG files through the chat template, the greedy tokens of transformers'
//! `generate` for every reference prompt.

mod common;

use std::path::{Path, PathBuf};

use common::{Reference, model_dir};
use serde_json::Value;
use vlm::processing::{Image, Message, Normalization};
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

/// Our normalised values back in 0-255 levels against the reference's levels (`[3, h, w]` per
/// image; Pixtral's reference is zero-padded to `padded_width`): the largest gap.
fn level_gap(values: &[f32], levels: &[u8], height: usize, width: usize, padded_width: usize) -> f32 {
    let Normalization { mean, std, .. } = Normalization::OPENAI_CLIP;
    assert_eq!(values.len(), 3 * height * width);
    let mut gap = 0f32;
    for c in 0..3 {
        for y in 0..height {
            for x in 0..width {
                let ours = values[(c * height + y) * width + x] * std[c] * 255.0 + mean[c] * 255.0;
                let theirs = f32::from(levels[(c * levels.len() / 3 / padded_width + y) * padded_width + x]);
                gap = gap.max((ours - theirs).abs());
            }
        }
    }
    gap
}

#[test]
fn chat_templates_render_and_tokenize_as_transformers() {
    let cases = json("processor/llava-cases.json");
    for case in cases["templates"].as_array().unwrap() {
        let checkpoint = case["family"].as_str().unwrap();
        let vlm = vlm(checkpoint);
        let image = Image::from_rgb8(32, 32, vec![90; 32 * 32 * 3]).unwrap();
        let messages = common::conversation(&case["messages"], Some(&image));
        let config = GenerationConfig::default();
        let rendered = vlm.processor().render(&messages, case["add_generation_prompt"].as_bool().unwrap()).unwrap();
        let expected = case["rendered"].as_str().unwrap();
        if expected.contains("[IMG][/INST]") && rendered != expected {
            // transformers' Pixtral template drops `{"type": "text", "text": ...}` parts (it reads
            // "content"); this crate's text parts carry both keys, so nothing is dropped.
            assert_eq!(rendered, "<s>[INST]ignored by this template[IMG][/INST]");
            continue;
        }
        assert_eq!(rendered, expected, "{checkpoint}");
        let has_image = messages.iter().any(|m| m.media().next().is_some());
        if !has_image {
            let ids = vlm.encode(&messages, &config).unwrap().input_ids;
            let want: Vec<u32> =
                case["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(ids, want, "{checkpoint}: {expected}");
        }
    }
}

#[test]
fn images_become_the_reference_ids_and_pixels() {
    let cases = json("processor/llava-cases.json");
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let checkpoint = case["family"].as_str().unwrap();
        let vlm = vlm(checkpoint);
        let image = Image::open(fixtures().join(case["image"].as_str().unwrap())).unwrap();
        let messages = common::conversation(&case["messages"], Some(&image));
        let encoding = vlm.encode(&messages, &GenerationConfig::default()).unwrap();
        let reference = Reference::load_file(&fixtures().join(case["file"].as_str().unwrap()));
        let ids: Vec<u32> = reference.ids("input_ids").concat();
        assert_eq!(encoding.input_ids, ids, "{name}: input ids");
        let (shape, levels) = reference.bytes("pixel_values_u8");
        let (height, width) = (shape[2], shape[3]);
        let gap = level_gap(&encoding.pixel_values, &levels, height, width, width);
        eprintln!("{name}: pixel values within {gap:.3} levels of transformers'");
        assert!(gap <= 1.0 + 1e-3, "{name}: pixel values differ by {gap} levels");
    }
}

#[test]
fn every_reference_prompt_generates_transformers_greedy_tokens() {
    for (checkpoint, weights) in
        [("pixtral", "pixtral"), ("pixtral-hf5", "pixtral"), ("llava", "llava"), ("llava-nobias", "llava-nobias")]
    {
        let vlm = vlm(checkpoint);
        let description = json(&format!("reference/{weights}.json"));
        let reference = Reference::load(weights);
        for (name, case) in description["cases"].as_object().unwrap() {
            let conversations: Vec<Vec<Message>> = match case["messages"][0].is_array() {
                true => case["messages"].as_array().unwrap().iter().map(|c| common::conversation(c, None)).collect(),
                false => vec![common::conversation(&case["messages"], None)],
            };
            let config = GenerationConfig::default().temperature(0.0).max_new_tokens(8).eos_token_ids(vec![]);
            let expected = reference.ids(&format!("{name}.input_ids"));
            let mask = reference.ids(&format!("{name}.attention_mask"));
            for (row, conversation) in conversations.iter().enumerate() {
                let encoding = vlm.encode(conversation, &config).unwrap();
                let unpadded: Vec<u32> =
                    expected[row].iter().zip(&mask[row]).filter(|&(_, &m)| m == 1).map(|(&id, _)| id).collect();
                assert_eq!(encoding.input_ids, unpadded, "{checkpoint} {name}: row {row} input ids");
            }
            let outputs = vlm.generate_batch(&conversations, &config).unwrap();
            let tokens = reference.ids(&format!("{name}.greedy_tokens"));
            for (row, output) in outputs.iter().enumerate() {
                assert_eq!(output.token_ids, tokens[row], "{checkpoint} {name}: row {row} greedy tokens");
            }
            eprintln!("{checkpoint} {name}: ids and {} greedy tokens per row identical", tokens[0].len());
        }
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let pixtral = vlm("pixtral");
    let config = GenerationConfig::default();
    // An image so elongated it shrinks to nothing within longest_edge (transformers makes a
    // zero-width image).
    let sliver = Image::from_rgb8(1, 1000, vec![7; 3000]).unwrap();
    let error = pixtral.encode(&[Message::user().image(sliver).text("?")], &config).unwrap_err();
    assert!(matches!(error, Error::Input(_)), "{error}");
    // Image tokens typed in the text.
    let error = pixtral.encode(&[Message::user().text("[IMG] what?")], &config).unwrap_err();
    assert!(matches!(error, Error::ImageCount { .. } | Error::InputMismatch { .. }), "{error}");
    // No videos.
    let frame = Image::from_rgb8(32, 32, vec![1; 32 * 32 * 3]).unwrap();
    let clip = vlm::processing::Video::from_frames(vec![frame.clone(); 2], 2.0).unwrap();
    let llava = vlm("llava");
    let error = llava.encode(&[Message::user().video(clip).text("?")], &config).unwrap_err();
    assert!(matches!(error, Error::Input(_)), "{error}");
    let error = llava.encode(&[Message::user().text("<image> what?")], &config).unwrap_err();
    assert!(matches!(error, Error::ImageCount { .. } | Error::InputMismatch { .. }), "{error}");
}

#[test]
fn a_processor_config_that_disagrees_with_the_model_is_a_config_error() {
    let copy = common::Scratch::of("llava");
    copy.edit_json("processor_config.json", |json| json["num_additional_image_tokens"] = 0.into());
    let Err(error) = Vlm::from_dir(copy.dir.path(), &vlm::device::cpu()) else { panic!("loaded") };
    assert!(matches!(&error, Error::Config { message, .. } if message.contains("35")), "{error}");
    // Without processor_config.json (early llava-hf snapshots) the model's count is used.
    let copy = common::Scratch::of("llava");
    std::fs::remove_file(copy.path("processor_config.json")).unwrap();
    let vlm = Vlm::from_dir(copy.dir.path(), &vlm::device::cpu()).unwrap();
    let image = Image::from_rgb8(32, 32, vec![90; 32 * 32 * 3]).unwrap();
    let encoding = vlm.encode(&[Message::user().image(image).text("?")], &GenerationConfig::default()).unwrap();
    assert_eq!(encoding.image_tokens(), 36);
}
