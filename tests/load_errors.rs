//! Every way a checkpoint can be broken gives its own readable, typed error, never a panic.

mod common;

use std::path::Path;

use common::Scratch;
use safetensors::Dtype;
use vlm::Error;
use vlm::loader::load_internvl;

/// Loads a broken scratch checkpoint, which must fail.
fn load_error(scratch: &Scratch) -> Error {
    match load_internvl(scratch.dir.path(), &vlm::device::cpu()) {
        Ok(_) => panic!("loading {} should fail", scratch.dir.path().display()),
        Err(error) => error,
    }
}

fn floats(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

const NORM: &str = "language_model.model.norm.weight";

#[test]
fn truncated_safetensors_is_a_corrupt_file_error() {
    let scratch = Scratch::of("internvl3-hf");
    let bytes = std::fs::read(scratch.path("model.safetensors")).unwrap();
    std::fs::write(scratch.path("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let error = load_error(&scratch);
    assert!(matches!(&error, Error::Safetensors { path, .. } if path.ends_with("model.safetensors")), "{error}");
    assert!(error.to_string().starts_with("corrupt safetensors file"), "{error}");
}

#[test]
fn garbage_header_is_a_corrupt_file_error() {
    let scratch = Scratch::of("internvl3-hf");
    let mut bytes = 64u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'{'; 64]);
    std::fs::write(scratch.path("model.safetensors"), bytes).unwrap();
    assert!(matches!(load_error(&scratch), Error::Safetensors { .. }));
}

#[test]
fn missing_tensor_is_named() {
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_weights(|tensors| {
        tensors.remove(NORM);
    });
    match load_error(&scratch) {
        Error::Weights { missing, unused } => {
            assert_eq!(missing, vec!["language_model.norm.weight".to_string()]);
            assert!(unused.is_empty());
        }
        other => panic!("expected a missing-weights error, got {other}"),
    }
}

#[test]
fn unexpected_tensor_is_named() {
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_weights(|tensors| {
        tensors.insert("vision_tower.extra.weight".into(), (Dtype::F32, vec![2], floats(&[1.0, 2.0])));
    });
    let error = load_error(&scratch);
    match &error {
        Error::Weights { missing, unused } => {
            assert!(missing.is_empty());
            assert_eq!(unused, &vec!["vision_tower.extra.weight".to_string()]);
        }
        other => panic!("expected an unused-weights error, got {other}"),
    }
    assert_eq!(error.to_string(), "1 checkpoint tensors not used by the model: vision_tower.extra.weight");
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_weights(|tensors| {
        tensors.insert(NORM.into(), (Dtype::F32, vec![3], floats(&[1.0, 2.0, 3.0])));
    });
    match load_error(&scratch) {
        Error::ShapeMismatch { name, expected, found } => {
            assert_eq!(name, NORM);
            assert_eq!(expected, vec![64]);
            assert_eq!(found, vec![3]);
        }
        other => panic!("expected a shape error, got {other}"),
    }
}

#[test]
fn fused_qkv_of_the_wrong_height_is_a_shape_error() {
    let scratch = Scratch::of("internvl3-original");
    let name = "vision_model.encoder.layers.0.attn.qkv.bias";
    scratch.edit_weights(|tensors| {
        tensors.insert(name.into(), (Dtype::F32, vec![4], floats(&[0.0; 4])));
    });
    match load_error(&scratch) {
        Error::ShapeMismatch { name: got, expected, found } => {
            assert_eq!(got, name);
            assert_eq!((expected, found), (vec![96], vec![4]));
        }
        other => panic!("expected a shape error, got {other}"),
    }
}

#[test]
fn integer_weights_are_an_unsupported_dtype_error() {
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_weights(|tensors| {
        let ints: Vec<u8> = (0..64i32).flat_map(|v| v.to_le_bytes()).collect();
        tensors.insert(NORM.into(), (Dtype::I32, vec![64], ints));
    });
    assert!(matches!(load_error(&scratch), Error::UnsupportedDtype { name, .. } if name == NORM));
}

#[test]
fn malformed_config_json_is_a_json_error_with_its_path() {
    let scratch = Scratch::of("internvl3-hf");
    std::fs::write(scratch.path("config.json"), "{\"architectures\": [\"InternVLForConditionalGeneration\"],").unwrap();
    let error = load_error(&scratch);
    assert!(matches!(&error, Error::Json { path, .. } if path.ends_with("config.json")), "{error}");
    assert!(error.to_string().contains("config.json"), "{error}");
}

#[test]
fn config_with_a_wrongly_typed_field_is_a_json_error() {
    let scratch = Scratch::of("internvl3-hf");
    let text = std::fs::read_to_string(scratch.path("config.json")).unwrap();
    let text = text.replacen("\"num_hidden_layers\": 3", "\"num_hidden_layers\": \"three\"", 1);
    std::fs::write(scratch.path("config.json"), text).unwrap();
    let error = load_error(&scratch);
    assert!(matches!(&error, Error::Json { .. }), "{error}");
    assert!(error.to_string().contains("invalid type"), "{error}");
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let scratch = Scratch::of("internvl3-hf");
    std::fs::write(scratch.path("config.json"), r#"{"architectures": ["GPT2LMHeadModel"]}"#).unwrap();
    let error = load_error(&scratch);
    assert!(matches!(&error, Error::UnsupportedArchitecture { .. }), "{error}");
    assert!(error.to_string().contains("InternVLChatModel"), "{error}");
}

#[test]
fn inconsistent_config_is_a_config_error() {
    let scratch = Scratch::of("internvl3-hf");
    let text = std::fs::read_to_string(scratch.path("config.json")).unwrap();
    let text = text.replacen("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3", 1);
    std::fs::write(scratch.path("config.json"), text).unwrap();
    assert!(matches!(load_error(&scratch), Error::Config { message, .. } if message.contains("num_key_value_heads")));
}

#[test]
fn missing_weights_file_is_an_io_error_naming_it() {
    let scratch = Scratch::of("internvl3-hf");
    std::fs::remove_file(scratch.path("model.safetensors")).unwrap();
    let error = load_error(&scratch);
    assert!(matches!(&error, Error::Io { path, .. } if path.ends_with("model.safetensors")), "{error}");
}

#[test]
fn shard_missing_from_disk_is_an_io_error_naming_it() {
    let scratch = Scratch::of("internvl3-hf-sharded");
    let shard = std::fs::read_dir(scratch.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("model-00002"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let error = load_error(&scratch);
    assert!(matches!(&error, Error::Io { path, .. } if path == &shard), "{error}");
}

#[test]
fn missing_config_is_an_io_error() {
    let error = load_internvl(Path::new("/nonexistent/checkpoint"), &vlm::device::cpu()).err().unwrap();
    assert!(matches!(error, Error::Io { .. }));
}

#[test]
fn a_config_far_bigger_than_its_weights_is_refused_before_allocating() {
    // hidden_size 10^12 used to abort the process allocating 500 GB inside the decoder's init.
    for (field, value) in [
        ("hidden_size", 1_000_000_000_000u64),
        ("intermediate_size", 1_000_000_000_000),
        ("num_hidden_layers", 1_000_000_000_000),
        ("vocab_size", 1 << 40),
        ("head_dim", 1 << 40),
    ] {
        let scratch = Scratch::of("internvl3-hf");
        scratch.edit_json("config.json", |config| config["text_config"][field] = value.into());
        let error = load_error(&scratch);
        assert!(matches!(&error, Error::Config { .. }), "{field}: {error}");
    }
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_json("config.json", |config| config["vision_config"]["image_size"] = [1 << 30, 1 << 30].into());
    assert!(matches!(load_error(&scratch), Error::Config { .. }));
}

#[test]
fn negative_epsilon_in_config_is_a_config_error() {
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_json("config.json", |config| config["text_config"]["rms_norm_eps"] = (-1.0).into());
    assert!(matches!(load_error(&scratch), Error::Config { message, .. } if message.contains("rms_norm_eps")));
}

#[test]
fn zero_image_std_is_a_config_error() {
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_json("preprocessor_config.json", |config| config["image_std"] = serde_json::json!([0.0, 0.0, 0.0]));
    let error = vlm::Vlm::from_dir(scratch.dir.path(), &vlm::device::cpu()).err().expect("must fail");
    assert!(matches!(&error, Error::Config { message, .. } if message.contains("image_std")), "{error}");
}

#[test]
fn out_of_range_generation_config_is_a_config_error() {
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_json("generation_config.json", |config| config["top_p"] = 5.0.into());
    let error = vlm::Vlm::from_dir(scratch.dir.path(), &vlm::device::cpu()).err().expect("must fail");
    assert!(matches!(&error, Error::Config { path, .. } if path.ends_with("generation_config.json")), "{error}");
}

#[test]
fn shard_index_pointing_outside_the_checkpoint_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let scratch = Scratch::of("internvl3-hf-sharded");
    // A complete checkpoint one level up, which the index must not be able to reach.
    let first = std::fs::read_dir(scratch.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("model-00001"))
        .unwrap();
    std::fs::copy(&first, outside.path().join("x.safetensors")).unwrap();
    // Both are in the temporary directory, so this resolves to the copy.
    let escape = format!("../{}/x.safetensors", outside.path().file_name().unwrap().to_str().unwrap());
    scratch.edit_json("model.safetensors.index.json", |index| {
        for shard in index["weight_map"].as_object_mut().unwrap().values_mut() {
            if shard.as_str().unwrap().starts_with("model-00001") {
                *shard = escape.clone().into();
            }
        }
    });
    let error = load_error(&scratch);
    assert!(matches!(&error, Error::Safetensors { reason, .. } if reason.contains("inside the checkpoint")), "{error}");
}
