//! Helpers shared by the integration tests: fixture paths, reference tensors, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use burn::tensor::{Int, Tensor, TensorData};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use vlm::Device;

/// Builds an example with the same cargo and profile as the running test, and returns its path.
pub fn example(name: &str) -> PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building example {name}");
    // the test: target/<profile>/deps/<test>-<hash>; examples: target/<profile>/examples/<name>
    let profile_dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    profile_dir.join("examples").join(name)
}

/// A running `serve` example, killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the `serve` example on a free loopback port with a fixture checkpoint.
pub fn start_server(fixture: &str, name: &str, extra: &[&str]) -> Server {
    let mut child = Command::new(example("serve"))
        .args(["--model", model_dir(fixture).to_str().unwrap(), "--served-model-name", name, "--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected: {line:?}")).to_string();
    Server { child, url }
}

/// `tests/fixtures/images/<name>`.
pub fn fixture_image(name: &str) -> String {
    format!("{}/tests/fixtures/images/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The messages of a reference conversation (`messages` of a fixture's JSON, as transformers'
/// processors take them). Every image is `image` when given, else the named fixture file; a video
/// is the fixture's frames at `fps`; text parts are read from `text` or, as Pixtral's cards write
/// them, `content`.
pub fn conversation_with(
    messages: &serde_json::Value,
    image: Option<&vlm::Image>,
    fps: Option<f64>,
) -> Vec<vlm::Message> {
    use serde_json::Value;
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|message| {
            let mut out = match message["role"].as_str().unwrap() {
                "system" => vlm::Message::system(),
                "assistant" => vlm::Message::assistant(),
                _ => vlm::Message::user(),
            };
            match &message["content"] {
                Value::String(text) => out = out.text(text),
                Value::Array(parts) => {
                    for part in parts {
                        out = match part["type"].as_str().unwrap() {
                            "text" => out.text(part.get("text").or(part.get("content")).unwrap().as_str().unwrap()),
                            "image" => out.image(match image {
                                Some(image) => image.clone(),
                                None => vlm::Image::open(fixture_image(part["image"].as_str().unwrap())).unwrap(),
                            }),
                            "video" => {
                                let frames = Path::new(&fixture_image("video")).to_path_buf();
                                out.video(
                                    vlm::processing::Video::open_dir(frames, fps.expect("a video's fps")).unwrap(),
                                )
                            }
                            other => panic!("part type {other}"),
                        };
                    }
                }
                other => panic!("content {other}"),
            }
            out
        })
        .collect()
}

/// [`conversation_with`] for conversations without videos.
pub fn conversation(messages: &serde_json::Value, image: Option<&vlm::Image>) -> Vec<vlm::Message> {
    conversation_with(messages, image, None)
}

/// Every conversation of a reference case (one, or one per row of a batch), videos at the case's
/// fps.
pub fn case_conversations(case: &serde_json::Value) -> Vec<Vec<vlm::Message>> {
    let fps = case["video"].get("video_metadata").map(|metadata| metadata["fps"].as_f64().unwrap());
    let messages = &case["messages"];
    match messages[0].is_array() {
        true => messages.as_array().unwrap().iter().map(|c| conversation_with(c, None, fps)).collect(),
        false => vec![conversation_with(messages, None, fps)],
    }
}

/// `tests/fixtures/models/<name>`.
pub fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

/// A scratch copy of a fixture checkpoint that a test can break.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn of(fixture: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(model_dir(fixture)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
        Self { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Rewrites `model.safetensors` after letting `edit` change its tensors.
    pub fn edit_weights(&self, edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
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

    /// Rewrites a JSON file of the checkpoint after letting `edit` change it.
    pub fn edit_json(&self, file: &str, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.path(file)).unwrap()).unwrap();
        edit(&mut value);
        std::fs::write(self.path(file), serde_json::to_string_pretty(&value).unwrap()).unwrap();
    }

    /// Splits `model.safetensors` into `shards` files with a `model.safetensors.index.json`, as
    /// `save_pretrained` writes large checkpoints.
    pub fn shard(&self, shards: usize) {
        let bytes = std::fs::read(self.path("model.safetensors")).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = file.names().into_iter().map(String::from).collect();
        names.sort();
        let per_shard = names.len().div_ceil(shards);
        let mut weight_map = serde_json::Map::new();
        for (index, chunk) in names.chunks(per_shard).enumerate() {
            let shard = format!("model-{:05}-of-{shards:05}.safetensors", index + 1);
            let views: Vec<(String, TensorView)> =
                chunk.iter().map(|name| (name.clone(), file.tensor(name).unwrap())).collect();
            std::fs::write(self.path(&shard), safetensors::serialize(views, None).unwrap()).unwrap();
            for name in chunk {
                weight_map.insert(name.clone(), shard.clone().into());
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": bytes.len()}, "weight_map": weight_map});
        std::fs::write(self.path("model.safetensors.index.json"), index.to_string()).unwrap();
        std::fs::remove_file(self.path("model.safetensors")).unwrap();
    }

    /// Changes the f32 values of one tensor of `model.safetensors`.
    pub fn edit_floats(&self, name: &str, edit: impl FnOnce(&[usize], &mut Vec<f32>)) {
        self.edit_weights(|tensors| {
            let (dtype, shape, data) = tensors.get_mut(name).unwrap_or_else(|| panic!("no tensor {name}"));
            assert_eq!(*dtype, Dtype::F32, "{name}");
            let mut values: Vec<f32> =
                data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            edit(shape, &mut values);
            *data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        });
    }
}

/// One prompt (`<name>.<tensor>`) of a reference file.
pub struct Case<'a> {
    pub reference: &'a Reference,
    pub name: &'a str,
}

impl Case<'_> {
    pub fn key(&self, tensor: &str) -> String {
        format!("{}.{tensor}", self.name)
    }

    pub fn has(&self, tensor: &str) -> bool {
        self.reference.has(&self.key(tensor))
    }

    pub fn ids(&self, tensor: &str) -> Vec<Vec<u32>> {
        self.reference.ids(&self.key(tensor))
    }

    pub fn floats(&self, tensor: &str) -> (Vec<usize>, Vec<f32>) {
        self.reference.floats(&self.key(tensor))
    }

    pub fn ints(&self, tensor: &str) -> (Vec<usize>, Vec<i64>) {
        self.reference.ints(&self.key(tensor))
    }

    /// Left padding of each row, from the attention mask.
    pub fn padding(&self) -> Vec<usize> {
        self.ids("attention_mask").iter().map(|row| row.iter().take_while(|&&m| m == 0).count()).collect()
    }
}

/// Runs the prompt of `case` and then each of transformers' greedy tokens through `logits_of`
/// (which appends to the cache), checking the prompt logits where the reference stores them,
/// every step's logits within `tolerance`, and each step's argmax against transformers' token.
pub fn check_logits_and_greedy_steps(
    label: &str,
    case: &Case,
    pixels: Option<vlm::models::Pixels>,
    tolerance: f32,
    new_cache: impl FnOnce(usize, usize) -> vlm::nn::KvCache,
    mut logits_of: impl FnMut(&vlm::models::ModelInputs, &mut vlm::nn::KvCache) -> Tensor<3>,
) {
    let name = case.name;
    let ids = case.ids("input_ids");
    let batch = ids.len();
    let steps = case.ids("greedy_tokens")[0].len();
    let mut cache = new_cache(batch, ids[0].len() + steps).with_left_padding(case.padding()).unwrap();
    let logits = logits_of(&vlm::models::ModelInputs { input_ids: ids.clone(), pixels }, &mut cache);
    let [_, len, vocab] = logits.dims();
    if case.has("logits") {
        let error = relative_error(logits.clone(), &case.floats("logits"));
        eprintln!("{label} {name}: prompt logits relative error {error:e}");
        assert!(error <= tolerance, "{label} {name}: logits relative error {error:e}");
    }
    let (_, step_logits) = case.floats("greedy_step_logits"); // [batch, steps, vocab]
    let expected = case.ids("greedy_tokens");
    let mut last = logits.narrow(1, len - 1, 1);
    let mut worst = 0f32;
    for step in 0..steps {
        let rows = last.clone().reshape([batch, vocab]).into_data().try_to_vec::<f32>().unwrap();
        for b in 0..batch {
            let want = &step_logits[(b * steps + step) * vocab..(b * steps + step + 1) * vocab];
            let error = relative_error_of(&rows[b * vocab..(b + 1) * vocab], want);
            worst = worst.max(error);
            assert!(error <= tolerance, "{label} {name}: row {b} step {step} relative error {error:e}");
            let token = vlm::generation::sampler::argmax(&rows[b * vocab..(b + 1) * vocab]);
            assert_eq!(token, expected[b][step], "{label} {name}: row {b} step {step}");
        }
        let next =
            vlm::models::ModelInputs { input_ids: expected.iter().map(|row| vec![row[step]]).collect(), pixels: None };
        last = logits_of(&next, &mut cache);
    }
    eprintln!("{label} {name}: {steps} greedy steps, worst logits relative error {worst:e}");
}

/// The top-1 minus top-2 logit of each greedy step of a single-prompt reference
/// (`greedy_margins` of `tests/fixtures/reference/<name>.json`).
pub fn reference_margins(name: &str) -> Vec<f32> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/reference/{name}.json"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["greedy_margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap() as f32).collect()
}

/// The top-1 minus top-2 logit of each greedy step of the case `name` of a conversation
/// reference (`cases.<name>.greedy_margins` of `tests/fixtures/reference/<weights>.json`).
pub fn reference_margins_of(weights: &str, name: &str) -> Vec<f32> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/reference/{weights}.json"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["cases"][name]["greedy_margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap() as f32).collect()
}

/// Reference activations written by `scripts/make_fixtures.py`.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    /// Any reference file.
    pub fn load_file(path: &Path) -> Self {
        Self { bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) }
    }

    /// `tests/fixtures/reference/<weights>.safetensors`.
    pub fn load(weights: &str) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/reference")
            .join(format!("{weights}.safetensors"));
        Self { bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) }
    }

    fn view(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let tensors = SafeTensors::deserialize(&self.bytes).expect("reference file");
        let view = tensors.tensor(name).unwrap_or_else(|_| panic!("reference has no {name}"));
        (view.dtype(), view.shape().to_vec(), view.data().to_vec())
    }

    /// Whether the reference holds `name`.
    pub fn has(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.bytes).expect("reference file").tensor(name).is_ok()
    }

    /// An i64 tensor as (shape, values).
    pub fn ints(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (dtype, shape, data) = self.view(name);
        assert_eq!(dtype, Dtype::I64, "{name}");
        (shape, data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect())
    }

    /// A u8 tensor as (shape, values).
    pub fn bytes(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let (dtype, shape, data) = self.view(name);
        assert_eq!(dtype, Dtype::U8, "{name}");
        (shape, data)
    }

    /// An f32 tensor as (shape, values).
    pub fn floats(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (dtype, shape, data) = self.view(name);
        assert_eq!(dtype, Dtype::F32, "{name}");
        (shape, data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// An i64 tensor as rows of u32 (last dimension per row).
    pub fn ids(&self, name: &str) -> Vec<Vec<u32>> {
        let (dtype, shape, data) = self.view(name);
        assert_eq!(dtype, Dtype::I64, "{name}");
        let values: Vec<u32> = data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
        let width = *shape.last().unwrap();
        values.chunks(width).map(<[u32]>::to_vec).collect()
    }

    /// A float tensor on `device`.
    pub fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        let (shape, values) = self.floats(name);
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

/// `max |actual - expected| / max |expected|`: the error relative to the reference's scale.
pub fn relative_error<const D: usize>(actual: Tensor<D>, expected: &(Vec<usize>, Vec<f32>)) -> f32 {
    let actual_shape = actual.dims().to_vec();
    assert_eq!(actual_shape, expected.0, "shape");
    relative_error_of(&actual.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(), &expected.1)
}

/// [`relative_error`] of plain values. Any non-finite value on either side gives infinity, so no
/// comparison `error <= bound` can pass (`f32::max` would silently drop a NaN).
pub fn relative_error_of(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len(), "length");
    if actual.iter().chain(expected).any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = actual.iter().zip(expected).fold(0f32, |m, (a, e)| m.max((a - e).abs()));
    if diff == 0.0 { 0.0 } else { diff / scale }
}

/// Index of the largest value in each row of `[rows, n]`.
pub fn argmax_rows(logits: Tensor<2>) -> Vec<u32> {
    let ids: Tensor<2, Int> = logits.argmax(1);
    ids.into_data().convert::<i64>().try_to_vec::<i64>().unwrap().into_iter().map(|v| v as u32).collect()
}
