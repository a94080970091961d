//! Criterion benchmarks of the CPU path on the committed fixture model (tiny, random weights):
//! preprocessing, the vision tower, one decode step, a short greedy generation, and the metrics.
//!
//! cargo bench --bench cpu

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};
use vlm::eval::metrics::{anls, vqa_accuracy};
use vlm::eval::normalize_vqa_answer;
use vlm::models::{ModelInputs, Pixels};
use vlm::{GenerationConfig, Image, Message, Vlm};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)
}

fn model() -> Vlm {
    Vlm::from_dir(&fixture("models/internvl3-hf"), &vlm::device::cpu()).expect("fixture model")
}

fn preprocessing(c: &mut Criterion) {
    let vlm = model();
    let bytes = std::fs::read(fixture("images/large.png")).unwrap();
    let config = GenerationConfig::default().max_tiles(12);
    c.bench_function("decode and tile a 1000x750 PNG, tokenize the prompt", |b| {
        b.iter(|| {
            let image = Image::from_bytes(&bytes).unwrap();
            let messages = [Message::user().image(image).text("Describe the image.")];
            black_box(vlm.encode(&messages, &config).unwrap())
        })
    });
}

fn model_steps(c: &mut Criterion) {
    let vlm = model();
    let messages = [Message::user().image(Image::open(fixture("images/square.png")).unwrap()).text("What is it?")];
    let encoding = vlm.encode(&messages, &GenerationConfig::default()).unwrap();
    let model = vlm.model();
    let Some(Pixels::Tiles(pixel_values)) = encoding.pixels(&vlm::device::cpu()) else { panic!("one image") };
    c.bench_function("vision tower + projector, 1 tile", |b| {
        let internvl = model.as_internvl().expect("an InternVL fixture");
        b.iter(|| black_box(internvl.image_features(pixel_values.clone()).unwrap().into_data()))
    });

    let prompt = ModelInputs { input_ids: vec![encoding.input_ids.clone()], pixels: Some(Pixels::Tiles(pixel_values)) };
    let mut cache = model.new_cache(1, encoding.input_ids.len() + 2);
    model.forward(&prompt, &mut cache).unwrap();
    let filled = cache.len();
    c.bench_function("one decode step (batch 1)", |b| {
        b.iter(|| {
            cache.truncate(filled).unwrap();
            let step = ModelInputs { input_ids: vec![vec![42]], pixels: None };
            black_box(model.forward(&step, &mut cache).unwrap().into_data())
        })
    });

    let greedy = GenerationConfig::default().temperature(0.0).max_new_tokens(16);
    c.bench_function("generate 16 tokens, greedy, 1 image", |b| {
        b.iter(|| black_box(vlm.generate(&messages, &greedy).unwrap()))
    });
}

fn metrics(c: &mut Criterion) {
    let references = ["two dogs", "2 dogs", "2", "dogs", "two", "2 dogs", "2", "2", "two dogs", "2"];
    c.bench_function("VQA accuracy against 10 answers", |b| {
        b.iter(|| black_box(vqa_accuracy(black_box("Two dogs."), &references)))
    });
    c.bench_function("ANLS", |b| b.iter(|| black_box(anls(black_box("Main Streeet 42"), &["main street 42"]))));
    c.bench_function("VQA answer normalisation", |b| {
        b.iter(|| black_box(normalize_vqa_answer(black_box("The man's hat is red, isnt it?"))))
    });
}

criterion_group!(benches, preprocessing, model_steps, metrics);
criterion_main!(benches);
