//! Property tests over every parser a user's input reaches: safetensors headers, `config.json`,
//! `preprocessor_config.json`, image bytes, chat messages and the server's HTTP bodies. Each case
//! must end in `Ok` or a typed error: no panic, no abort, no unbounded allocation.
//!
//! CI runs a few thousand cases in all. For millions, locally (a release build is ~20x faster):
//!
//! ```sh
//! PROPTEST_CASES=1000000 cargo test --release --test properties
//! ```
//! `PROPTEST_CASES` scales every property here; the cheap ones run 8x that many cases.

mod common;

use std::path::Path;

use common::{Scratch, model_dir};
use proptest::prelude::*;
use serde_json::{Value, json};
use vlm::loader::WeightFiles;
use vlm::processing::{ImageLimits, ProcessOptions};
use vlm::{GenerationConfig, Image, Message, Vlm};

/// `PROPTEST_CASES` (default 256) times `factor`.
fn cases(factor: u32) -> ProptestConfig {
    let base = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256u32);
    ProptestConfig { cases: base.saturating_mul(factor), failure_persistence: None, ..ProptestConfig::default() }
}

/// Byte edits: (position, new value) pairs applied modulo the length.
fn edits(max: usize) -> impl Strategy<Value = Vec<(usize, u8)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>()), 1..max)
}

fn apply(bytes: &[u8], edits: &[(usize, u8)], within: usize) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    let within = within.min(bytes.len()).max(1);
    for &(at, value) in edits {
        bytes[at % within] = value;
    }
    bytes
}

/// A JSON value a hostile or careless file might hold where a number belongs.
fn odd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(3)),
        (0u64..10_000).prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|x| json!(x)),
        Just(json!(1e300)),
        Just(json!(-1e-300)),
        Just(Value::Null),
        Just(json!("12")),
        Just(json!([1, 2])),
        Just(json!({})),
    ]
}

const CONFIG_FIELDS: &[&str] = &[
    "text_config.hidden_size",
    "text_config.intermediate_size",
    "text_config.num_hidden_layers",
    "text_config.num_attention_heads",
    "text_config.num_key_value_heads",
    "text_config.head_dim",
    "text_config.vocab_size",
    "text_config.rms_norm_eps",
    "text_config.max_position_embeddings",
    "text_config.rope_parameters.rope_theta",
    "text_config.rope_parameters.rope_type",
    "vision_config.hidden_size",
    "vision_config.num_hidden_layers",
    "vision_config.num_attention_heads",
    "vision_config.intermediate_size",
    "vision_config.image_size",
    "vision_config.patch_size",
    "vision_config.layer_norm_eps",
    "vision_config.num_channels",
    "downsample_ratio",
    "vision_feature_layer",
    "image_token_id",
    "tie_word_embeddings",
];

const PREPROCESSOR_FIELDS: &[&str] =
    &["size", "size.height", "min_patches", "max_patches", "image_mean", "image_std", "rescale_factor"];

fn set(root: &mut Value, path: &str, value: Value) {
    let mut node = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if !node.is_object() {
            *node = json!({});
        }
        if parts.peek().is_none() {
            node[part] = value;
            return;
        }
        node = &mut node[part];
    }
}

/// A greedy one-token answer: whatever loaded must also run, or fail with a typed error.
fn answer_once(vlm: &Vlm) {
    let image = Image::open(common::fixture_image("wide.png")).unwrap();
    let messages = [Message::user().image(image).text("What is this?")];
    let _ = vlm.generate(&messages, &GenerationConfig::default().temperature(0.0).max_new_tokens(1));
}

proptest! {
    #![proptest_config(cases(8))]

    #[test]
    fn safetensors_headers_never_panic(edits in edits(8), grow in any::<bool>()) {
        let original = std::fs::read(model_dir("internvl3-hf").join("model.safetensors")).unwrap();
        let header = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
        // Edit the length prefix and the JSON header (where parsing happens), sometimes anywhere.
        let mut bytes = apply(&original, &edits, if grow { original.len() } else { header });
        if grow {
            bytes.truncate(bytes.len() - edits[0].0 % 64);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(files) = WeightFiles::open_files(vec![path]) {
            let names: Vec<String> = files.names().map(String::from).collect();
            for name in names {
                let rows = files.get(&name).and_then(|entry| entry.shape.first().copied()).unwrap_or(1);
                let whole = std::iter::once(0..rows).collect::<Vec<_>>();
                let _ = files.read_rows(&name, &whole, burn::tensor::FloatDType::F32, false);
            }
        }
    }

    #[test]
    fn image_bytes_never_panic(file in 0..6usize, edits in edits(16), cut in any::<usize>()) {
        let name = ["photo.png", "photo.jpg", "photo.webp", "animated.gif", "photo.bmp", "palette.png"][file];
        let original = std::fs::read(common::fixture_image(name)).unwrap();
        let mut bytes = apply(&original, &edits, original.len());
        if cut % 4 == 0 {
            bytes.truncate(cut % bytes.len());
        }
        let limits = ImageLimits { max_pixels: 1 << 20 };
        if let Ok(image) = Image::from_bytes_with_limits(&bytes, &limits) {
            prop_assert!(u64::from(image.width()) * u64::from(image.height()) <= limits.max_pixels);
        }
        let _ = Image::dimensions_of(&bytes);
    }

    #[test]
    fn random_bytes_are_never_an_image_that_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Image::from_bytes(&bytes);
    }
}

proptest! {
    #![proptest_config(cases(1))]

    #[test]
    fn config_json_values_never_panic(
        mutations in proptest::collection::vec((0..CONFIG_FIELDS.len(), odd_value()), 1..4)
    ) {
        let scratch = Scratch::of("internvl3-hf");
        scratch.edit_json("config.json", |config| {
            for (field, value) in &mutations {
                set(config, CONFIG_FIELDS[*field], value.clone());
            }
        });
        if let Ok(vlm) = Vlm::from_dir(scratch.dir.path(), &vlm::device::cpu()) {
            answer_once(&vlm);
        }
    }

    #[test]
    fn preprocessor_config_values_never_panic(
        mutations in proptest::collection::vec((0..PREPROCESSOR_FIELDS.len(), odd_value()), 1..4)
    ) {
        let scratch = Scratch::of("internvl3-hf");
        scratch.edit_json("preprocessor_config.json", |config| {
            for (field, value) in &mutations {
                set(config, PREPROCESSOR_FIELDS[*field], value.clone());
            }
        });
        if let Ok(vlm) = Vlm::from_dir(scratch.dir.path(), &vlm::device::cpu()) {
            answer_once(&vlm);
        }
    }

    #[test]
    fn chat_messages_never_panic(
        parts in proptest::collection::vec(
            (0..4usize, prop_oneof![".*", "<\\|im_(start|end)\\|>|<IMG_CONTEXT>|<img>|</img>|<image>", "[ \\n\\t]{0,3}"]),
            1..8,
        ),
        max_tiles in 0..4usize,
    ) {
        let vlm = processor_only();
        let image = Image::open(common::fixture_image("tiny.png")).unwrap();
        let messages: Vec<Message> = parts
            .iter()
            .map(|(role, text)| {
                let message = match role {
                    0 => Message::system(),
                    1 => Message::assistant(),
                    _ => Message::user(),
                };
                if *role == 3 { message.image(image.clone()).text(text.clone()) } else { message.text(text.clone()) }
            })
            .collect();
        let options = ProcessOptions { max_tiles: Some(max_tiles), ..ProcessOptions::default() };
        if let Ok(encoding) = vlm.processor().encode(&messages, &options) {
            prop_assert_eq!(encoding.pixel_values.len(), encoding.visuals.iter().map(vlm::processing::Visual::values).sum::<usize>());
        }
    }
}

/// One loaded model for the processor property (loading per case would dominate its time).
fn processor_only() -> &'static Vlm {
    static VLM: std::sync::OnceLock<Vlm> = std::sync::OnceLock::new();
    VLM.get_or_init(|| Vlm::from_dir(Path::new(&model_dir("internvl3-hf")), &vlm::device::cpu()).unwrap())
}

/// Where a hostile client can put anything in a chat request.
const REQUEST_FIELDS: &[&str] = &[
    "model",
    "messages",
    "messages.0",
    "messages.0.role",
    "messages.0.content",
    "messages.0.content.0",
    "messages.0.content.0.type",
    "messages.0.content.1.image_url.url",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options.include_usage",
];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        odd_value(),
        ".{0,12}".prop_map(Value::String),
        Just(json!("data:image/png;base64,AAAA")),
        Just(json!("user")),
        Just(json!(true)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// POSTs a body and returns the status and the JSON answer (every answer must be JSON).
fn post_body(server: &common::Server, body: &[u8]) -> (u16, Value) {
    let url = format!("{}/v1/chat/completions", server.url);
    let response = match ureq::post(&url).set("content-type", "application/json").send_bytes(body) {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("transport error: {error}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text:?}"));
    (status, value)
}

#[test]
fn http_bodies_get_an_answer_or_an_error_object() {
    // One server for every case (a static would never be dropped, leaving the process behind).
    let server = common::start_server("internvl3-hf", "tiny", &["--max-body-mib", "1"]);
    let image = image_data_uri();
    let strategy = (
        proptest::collection::vec((0..REQUEST_FIELDS.len(), any_json()), 0..4),
        proptest::option::weighted(0.2, proptest::collection::vec(any::<u8>(), 0..64)),
    );
    let mut runner = proptest::test_runner::TestRunner::new(cases(1));
    let result = runner.run(&strategy, |(mutations, raw)| {
        let mut request = json!({
            "model": "tiny",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": image}},
            ]}],
            "max_tokens": 2,
            "temperature": 0,
        });
        for (field, value) in &mutations {
            set(&mut request, REQUEST_FIELDS[*field], value.clone());
        }
        if request["max_tokens"].as_u64().is_some_and(|n| n > 8) {
            request["max_tokens"] = json!(8); // keep each case short; limits are tested elsewhere
        }
        request["stream"] = json!(false);
        let body = raw.unwrap_or_else(|| request.to_string().into_bytes());
        let (status, answer) = post_body(&server, &body);
        prop_assert!(
            (status == 200 && answer["choices"].is_array())
                || (status >= 400 && answer["error"]["message"].is_string()),
            "{status}: {answer}"
        );
        prop_assert!(status < 500 || status == 503, "{status}: {answer}");
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    let health = ureq::get(&format!("{}/health", server.url)).call().unwrap();
    assert_eq!(health.status(), 200);
}

fn image_data_uri() -> String {
    use base64::Engine;
    let png = std::fs::read(common::fixture_image("wide.png")).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}
