//! The command-line examples, built and invoked as a user would.

mod common;

use std::process::Command;

use common::{example, fixture_image, model_dir};

#[test]
fn describe_json_prints_one_object_with_the_library_answer() {
    let model = model_dir("internvl3-hf");
    let output = Command::new(example("describe"))
        .args(["--model", model.to_str().unwrap(), "--image", &fixture_image("wide.png")])
        .args(["--image", &fixture_image("tiny.png"), "--prompt", "Compare the two images."])
        .args(["--max-new-tokens", "6", "--temperature", "0", "--max-tiles", "4", "--device", "cpu", "--json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["text", "token_ids", "prompt_tokens", "stop_reason", "timings"]);
    for key in ["ttft_ms", "prefill_ms", "decode_ms", "prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(json["timings"][key].is_number(), "{key}");
    }

    // The same request through the library gives the same tokens.
    let vlm = vlm::Vlm::from_dir(&model, &vlm::device::cpu()).unwrap();
    let messages = [vlm::Message::user()
        .image(vlm::Image::open(fixture_image("wide.png")).unwrap())
        .image(vlm::Image::open(fixture_image("tiny.png")).unwrap())
        .text("Compare the two images.")];
    let config = vlm::GenerationConfig::default().max_new_tokens(6).temperature(0.0).max_tiles(4);
    let expected = vlm.generate(&messages, &config).unwrap();
    let ids: Vec<u32> = json["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, expected.token_ids);
    assert_eq!(json["text"], expected.text);
    assert_eq!(json["prompt_tokens"], expected.prompt_tokens);
    assert_eq!(json["stop_reason"], expected.stop_reason.to_string());
}

#[test]
fn describe_quantize_loads_8_and_4_bit_weights_as_the_library_does() {
    let model = model_dir("internvl3-hf");
    for kind in ["q8", "q4"] {
        let output = Command::new(example("describe"))
            .args(["--model", model.to_str().unwrap(), "--image", &fixture_image("wide.png"), "--quantize", kind])
            .args(["--prompt", "Describe it.", "--max-new-tokens", "6", "--temperature", "0", "--json"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{kind}: {}", String::from_utf8_lossy(&output.stderr));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let options = vlm::LoadOptions { quantize: Some(kind.parse().unwrap()) };
        let vlm = vlm::Vlm::from_dir_with(&model, &vlm::device::cpu(), &options).unwrap();
        let messages =
            [vlm::Message::user().image(vlm::Image::open(fixture_image("wide.png")).unwrap()).text("Describe it.")];
        let expected = vlm.generate(&messages, &vlm::GenerationConfig::default().max_new_tokens(6).temperature(0.0));
        assert_eq!(json["token_ids"], serde_json::json!(expected.unwrap().token_ids), "{kind}");
    }
    let output = Command::new(example("describe"))
        .args(["--model", model.to_str().unwrap(), "--image", &fixture_image("wide.png"), "--quantize", "q3"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("q8 or q4"));
}

#[test]
fn describe_reports_a_missing_image_without_panicking() {
    let output = Command::new(example("describe"))
        .args(["--model", model_dir("internvl3-hf").to_str().unwrap(), "--image", "no-such-image.png"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-image.png") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn chat_answers_each_turn_with_an_image_attached() {
    use std::io::Write;
    for checkpoint in ["nvlm-d", "pixtral", "llava", "nemotron-omni"] {
        let mut child = Command::new(example("chat"))
            .args(["--model", model_dir(checkpoint).to_str().unwrap(), "--max-new-tokens", "4", "--temperature", "0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let script = format!("/image {}\nWhat is it?\nAnd now?\n/quit\n", fixture_image("square.png"));
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{checkpoint}: {}", String::from_utf8_lossy(&output.stderr));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("attached 96x96 image"), "{checkpoint}: {stderr}");
        assert!(!stderr.contains("error"), "{checkpoint}: {stderr}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(stdout.matches("> ").count(), 4, "{checkpoint}: {stdout}"); // one prompt per input line
    }
}

#[test]
fn bench_prints_every_row_of_the_standard_workload_as_json() {
    let output = Command::new(example("bench")).args(["--size", "tiny", "--runs", "1"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let row: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for key in [
        "vision_ms_1tiles",
        "vision_ms_7tiles",
        "vision_ms_13tiles",
        "ttft_ms_13tiles",
        "ttft_ms_1tile",
        "first_ttft_ms_1tile",
        "decode_tok_s_bs1",
        "decode_tok_s_bs16",
    ] {
        let value = row[key].as_f64().unwrap_or_else(|| panic!("{key} in {row}"));
        assert!(value.is_finite() && value > 0.0, "{key} = {value}");
    }
    assert_eq!(row["params"], 131_808);
}

#[test]
fn describe_runs_pixtral_llava_and_nemotron_omni_checkpoints_as_transformers() {
    // transformers' generate on the same prompts (tests/fixtures/reference/{pixtral,llava,nemotron-omni}.json,
    // "single").
    for (checkpoint, image, prompt_tokens, tokens) in [
        ("pixtral", "pixtral-200x120.png", 56, [53, 78, 192, 431, 78, 140, 431, 222]),
        ("llava", "llava-120x80.png", 49, [53, 246, 153, 230, 330, 378, 243, 243]),
        ("nemotron-omni", "nemotron-200x90.png", 43, [340, 216, 102, 270, 367, 159, 425, 168]),
    ] {
        let output = Command::new(example("describe"))
            .args(["--model", model_dir(checkpoint).to_str().unwrap(), "--image", &common::fixture_image(image)])
            .args(["--prompt", "What is in this image?", "--max-new-tokens", "8", "--temperature", "0", "--json"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{checkpoint}: {}", String::from_utf8_lossy(&output.stderr));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(json["token_ids"], serde_json::json!(tokens), "{checkpoint}");
        assert_eq!(json["prompt_tokens"], prompt_tokens, "{checkpoint}");
    }
}

#[test]
fn describe_takes_video_frames_for_qwen_vl_and_answers_as_transformers() {
    let output = Command::new(example("describe"))
        .args(["--model", model_dir("qwen3-vl").to_str().unwrap(), "--video-frames"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/video"))
        .args(["--fps", "2", "--prompt", "What happens in the video?", "--max-new-tokens", "8"])
        .args(["--temperature", "0", "--json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // transformers' generate on the same frames (tests/fixtures/reference/qwen3-vl.json, "video").
    assert_eq!(json["token_ids"], serde_json::json!([167, 307, 407, 132, 77, 259, 77, 259]));
    assert_eq!(json["prompt_tokens"], 86);
}

/// `--dtype f16` on the CPU: weights and compute in half precision; the greedy tokens of
/// transformers' f32 `generate` while its top-1 / top-2 margin is clear (at least 0.5), for three
/// families. An unknown dtype is an error naming the choices.
#[test]
fn describe_in_half_precision_answers_as_transformers_where_the_margin_is_clear() {
    for (checkpoint, image, tokens) in [
        ("pixtral", "pixtral-200x120.png", [53, 78, 192, 431, 78, 140, 431, 222]),
        ("llava", "llava-120x80.png", [53, 246, 153, 230, 330, 378, 243, 243]),
        ("nemotron-omni", "nemotron-200x90.png", [340, 216, 102, 270, 367, 159, 425, 168]),
    ] {
        let output = Command::new(example("describe"))
            .args(["--model", model_dir(checkpoint).to_str().unwrap(), "--image", &common::fixture_image(image)])
            .args(["--prompt", "What is in this image?", "--max-new-tokens", "8", "--temperature", "0", "--json"])
            .args(["--dtype", "f16"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{checkpoint}: {}", String::from_utf8_lossy(&output.stderr));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let margins = common::reference_margins_of(checkpoint, "single");
        let clear = margins.iter().take_while(|&&margin| margin >= 0.5).count();
        let ours: Vec<u64> = json["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
        assert_eq!(ours[..clear], tokens.map(|t| t as u64)[..clear], "{checkpoint}: f16 greedy tokens");
    }
    let output = Command::new(example("describe"))
        .args(["--model", model_dir("llava").to_str().unwrap(), "--image", &common::fixture_image("llava-120x80.png")])
        .args(["--dtype", "f8"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("f32, f16 or bf16"));
}
