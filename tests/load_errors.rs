//! Every way a checkpoint can be broken gives its own readable, typed error, never a panic.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::model_dir;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use vlm::Error;
use vlm::loader::load_internvl;

/// A scratch copy of a fixture checkpoint that a test can break.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn of(fixture: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(model_dir(fixture)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Rewrites `model.safetensors` after letting `edit` change its tensors.
    fn edit_weights(&self, edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
        let bytes = std::fs::read(self.path("model.safetensors")).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = file
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, (view.dtype(), view.shape().to_vec(), view.data().to_vec())))
            .collect();
        edit(&mut tensors);
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(name, (dtype, shape, data))| (name.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
            .collect();
        let out = safetensors::serialize(views, None).unwrap();
        std::fs::write(self.path("model.safetensors"), out).unwrap();
    }

    fn load(&self) -> Error {
        match load_internvl(self.dir.path(), &vlm::device::cpu()) {
            Ok(_) => panic!("loading {} should fail", self.dir.path().display()),
            Err(error) => error,
        }
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
    let error = scratch.load();
    assert!(matches!(&error, Error::Safetensors { path, .. } if path.ends_with("model.safetensors")), "{error}");
    assert!(error.to_string().starts_with("corrupt safetensors file"), "{error}");
}

#[test]
fn garbage_header_is_a_corrupt_file_error() {
    let scratch = Scratch::of("internvl3-hf");
    let mut bytes = 64u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'{'; 64]);
    std::fs::write(scratch.path("model.safetensors"), bytes).unwrap();
    assert!(matches!(scratch.load(), Error::Safetensors { .. }));
}

#[test]
fn missing_tensor_is_named() {
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_weights(|tensors| {
        tensors.remove(NORM);
    });
    match scratch.load() {
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
    let error = scratch.load();
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
    match scratch.load() {
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
    match scratch.load() {
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
    assert!(matches!(scratch.load(), Error::UnsupportedDtype { name, .. } if name == NORM));
}

#[test]
fn malformed_config_json_is_a_json_error_with_its_path() {
    let scratch = Scratch::of("internvl3-hf");
    std::fs::write(scratch.path("config.json"), "{\"architectures\": [\"InternVLForConditionalGeneration\"],").unwrap();
    let error = scratch.load();
    assert!(matches!(&error, Error::Json { path, .. } if path.ends_with("config.json")), "{error}");
    assert!(error.to_string().contains("config.json"), "{error}");
}

#[test]
fn config_with_a_wrongly_typed_field_is_a_json_error() {
    let scratch = Scratch::of("internvl3-hf");
    let text = std::fs::read_to_string(scratch.path("config.json")).unwrap();
    let text = text.replacen("\"num_hidden_layers\": 3", "\"num_hidden_layers\": \"three\"", 1);
    std::fs::write(scratch.path("config.json"), text).unwrap();
    let error = scratch.load();
    assert!(matches!(&error, Error::Json { .. }), "{error}");
    assert!(error.to_string().contains("invalid type"), "{error}");
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let scratch = Scratch::of("internvl3-hf");
    std::fs::write(scratch.path("config.json"), r#"{"architectures": ["GPT2LMHeadModel"]}"#).unwrap();
    let error = scratch.load();
    assert!(matches!(&error, Error::UnsupportedArchitecture { .. }), "{error}");
    assert!(error.to_string().contains("InternVLChatModel"), "{error}");
}

#[test]
fn inconsistent_config_is_a_config_error() {
    let scratch = Scratch::of("internvl3-hf");
    let text = std::fs::read_to_string(scratch.path("config.json")).unwrap();
    let text = text.replacen("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3", 1);
    std::fs::write(scratch.path("config.json"), text).unwrap();
    assert!(matches!(scratch.load(), Error::Config { message, .. } if message.contains("num_key_value_heads")));
}

#[test]
fn missing_weights_file_is_an_io_error_naming_it() {
    let scratch = Scratch::of("internvl3-hf");
    std::fs::remove_file(scratch.path("model.safetensors")).unwrap();
    let error = scratch.load();
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
    let error = scratch.load();
    assert!(matches!(&error, Error::Io { path, .. } if path == &shard), "{error}");
}

#[test]
fn missing_config_is_an_io_error() {
    let error = load_internvl(Path::new("/nonexistent/checkpoint"), &vlm::device::cpu()).err().unwrap();
    assert!(matches!(error, Error::Io { .. }));
}
