//! The processor against transformers' InternVLProcessor (transformers-layout checkpoints) and
//! OpenGVLab's / NVIDIA's own preprocessing (OpenGVLab-layout checkpoints): tile grids, pixel values
//! (within one 0-255 level) and input ids (identical).

mod common;

use std::path::{Path, PathBuf};

use common::model_dir;
use safetensors::{Dtype, SafeTensors};
use vlm::config::CheckpointConfig;
use vlm::processing::tiling::{best_grid, split_into_tiles};
use vlm::processing::{AlphaMode, Encoding, Grid, ImageProcessor, ProcessOptions, TilingConfig, Visual};
use vlm::{Error, Image, Message, Processor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn processor(checkpoint: &str) -> Processor {
    let dir = model_dir(checkpoint);
    let config = CheckpointConfig::from_file(&dir.join("config.json")).unwrap();
    Processor::from_dir(&dir, &config).unwrap_or_else(|e| panic!("{checkpoint}: {e}"))
}

/// (grid, tiles, tile size) of each image of an InternVL encoding.
fn tiles(encoding: &Encoding) -> Vec<(Grid, usize, usize)> {
    encoding
        .visuals
        .iter()
        .map(|visual| match *visual {
            Visual::Tiles { grid, tiles, size, .. } => (grid, tiles, size),
            _ => panic!("an InternVL encoding has tiles"),
        })
        .collect()
}

fn normalization(processor: &Processor) -> vlm::processing::Normalization {
    match processor.images() {
        ImageProcessor::InternVl(images) => images.normalization,
        ImageProcessor::QwenVl(images) => images.normalization,
        other => panic!("{other:?}"),
    }
}

fn image(name: &str) -> Image {
    Image::open(fixtures().join("images").join(name)).unwrap()
}

/// Integer tensors and raw bytes of a reference file.
struct Reference(Vec<u8>);

impl Reference {
    fn load(path: PathBuf) -> Self {
        Self(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn tensor(&self, name: &str) -> (Vec<usize>, Dtype, Vec<u8>) {
        let file = SafeTensors::deserialize(&self.0).unwrap();
        let view = file.tensor(name).unwrap();
        (view.shape().to_vec(), view.dtype(), view.data().to_vec())
    }

    fn ints(&self, name: &str) -> Vec<i64> {
        let (_, dtype, data) = self.tensor(name);
        assert_eq!(dtype, Dtype::I64);
        data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }

    fn bytes(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let (shape, dtype, data) = self.tensor(name);
        assert_eq!(dtype, Dtype::U8);
        (shape, data)
    }
}

/// Our normalised pixel values back in 0-255 levels, compared with the reference's levels.
fn max_level_difference(
    pixel_values: &[f32],
    tile_size: usize,
    normalization: &vlm::processing::Normalization,
    reference: &[u8],
) -> f32 {
    assert_eq!(pixel_values.len(), reference.len());
    let plane = tile_size * tile_size;
    pixel_values
        .iter()
        .zip(reference)
        .enumerate()
        .map(|(i, (&value, &expected))| {
            let channel = (i / plane) % 3;
            let level =
                (value * normalization.std[channel] + normalization.mean[channel]) / normalization.rescale_factor;
            (level - f32::from(expected)).abs()
        })
        .fold(0.0, f32::max)
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    style: String,
    messages: Vec<CaseMessage>,
}

#[derive(serde::Deserialize)]
struct CaseMessage {
    role: String,
    content: Vec<serde_json::Value>,
}

fn messages(case: &Case) -> Vec<Message> {
    case.messages
        .iter()
        .map(|m| {
            let mut message = match m.role.as_str() {
                "system" => Message::system(),
                "assistant" => Message::assistant(),
                _ => Message::user(),
            };
            for part in &m.content {
                message = match part["type"].as_str() {
                    Some("text") => message.text(part["text"].as_str().unwrap()),
                    _ => message.image(image(part["path"].as_str().unwrap())),
                };
            }
            message
        })
        .collect()
}

#[test]
fn processor_matches_the_reference_for_every_case() {
    let text = std::fs::read_to_string(fixtures().join("processor/cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 15);
    for case in &cases {
        let checkpoint = match case.style.as_str() {
            "transformers" => "internvl3-hf",
            "internvl" => "internvl3-original",
            _ => "nvlm-d",
        };
        let processor = processor(checkpoint);
        let encoding = processor.encode(&messages(case), &ProcessOptions::default()).unwrap();
        let reference = Reference::load(fixtures().join(format!("processor/{}.safetensors", case.name)));

        let layout = tiles(&encoding);
        let grids: Vec<i64> = layout.iter().flat_map(|(grid, ..)| [grid.cols as i64, grid.rows as i64]).collect();
        assert_eq!(grids, reference.ints("grids"), "{}: tile grids", case.name);
        let per_image: Vec<i64> = layout.iter().map(|&(_, tiles, _)| tiles as i64).collect();
        assert_eq!(per_image, reference.ints("tiles_per_image"), "{}: tiles per image", case.name);
        let (count, size) = (layout.iter().map(|t| t.1).sum::<usize>(), layout[0].2);

        let ids: Vec<i64> = encoding.input_ids.iter().map(|&id| i64::from(id)).collect();
        assert_eq!(ids, reference.ints("input_ids"), "{}: input ids\nprompt: {:?}", case.name, encoding.prompt);

        let (shape, levels) = reference.bytes("pixels_u8");
        assert_eq!(shape, vec![count, 3, size, size], "{}", case.name);
        let diff = max_level_difference(&encoding.pixel_values, size, &normalization(&processor), &levels);
        assert!(diff <= 1.0 + 1e-3, "{}: pixel values differ by {diff} levels", case.name);
    }
}

#[test]
fn tile_grids_match_transformers_at_448_pixels() {
    #[derive(serde::Deserialize)]
    struct GridCase {
        width: u32,
        height: u32,
        grid: [usize; 2],
    }
    let text = std::fs::read_to_string(fixtures().join("processor/grids-448.json")).unwrap();
    let cases: Vec<GridCase> = serde_json::from_str(&text).unwrap();
    let config = TilingConfig { tile_size: 448, dynamic: true, min_tiles: 1, max_tiles: 12, use_thumbnail: true };
    for case in cases {
        let grid = best_grid(case.width, case.height, &config);
        assert_eq!(grid, Grid { cols: case.grid[0], rows: case.grid[1] }, "{}x{}", case.width, case.height);
    }
}

#[test]
fn tiles_match_transformers_at_448_pixels() {
    let config = TilingConfig { tile_size: 448, dynamic: true, min_tiles: 1, max_tiles: 12, use_thumbnail: true };
    let rgb = image("large.png").to_rgb8(AlphaMode::CompositeOnWhite);
    let (_, tiles) = split_into_tiles(&rgb, &config);
    let reference = Reference::load(fixtures().join("processor/large-448.safetensors"));
    let (shape, expected) = reference.bytes("pixels_u8_every_7th");
    assert_eq!(shape[0], tiles.len());
    let mut worst = 0i32;
    let mut k = 0;
    for tile in &tiles {
        for channel in 0..3 {
            for y in (3..448).step_by(7) {
                for x in (3..448).step_by(7) {
                    let ours = i32::from(tile.get_pixel(x, y).0[channel]);
                    worst = worst.max((ours - i32::from(expected[k])).abs());
                    k += 1;
                }
            }
        }
    }
    assert!(worst <= 1, "448-pixel tiles differ by {worst} levels");
}

#[test]
fn every_format_decodes_like_pil() {
    let reference = Reference::load(fixtures().join("images/decoded-by-pil.safetensors"));
    for (file, tolerance) in [
        ("photo.png", 0),
        ("photo.bmp", 0),
        ("photo.webp", 0),
        ("animated.gif", 0),
        ("gray.png", 0),
        ("palette.png", 0),
        ("photo.jpg", 3),
    ] {
        let decoded = image(file).to_rgb8(AlphaMode::Discard);
        let (shape, expected) = reference.bytes(&file.replace('.', "_"));
        assert_eq!(shape, vec![decoded.height() as usize, decoded.width() as usize, 3], "{file}");
        let worst = decoded.as_raw().iter().zip(&expected).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= tolerance, "{file}: differs from PIL by {worst} levels");
    }
}

#[test]
fn tile_limits_can_be_overridden_per_call() {
    let processor = processor("internvl3-hf");
    let messages = [Message::user().image(image("wide.png")).text("Describe.")];
    let full = processor.encode(&messages, &ProcessOptions::default()).unwrap();
    assert_eq!(tiles(&full)[0].0, Grid { cols: 3, rows: 1 });
    assert_eq!(tiles(&full)[0].1, 4);
    let bounded = processor.encode(&messages, &ProcessOptions { max_tiles: Some(2), ..Default::default() }).unwrap();
    assert_eq!(tiles(&bounded)[0].0, Grid { cols: 2, rows: 1 });
    assert_eq!(tiles(&bounded)[0].1, 3);
    let invalid = ProcessOptions { max_tiles: Some(0), ..Default::default() };
    assert!(matches!(processor.encode(&messages, &invalid), Err(Error::Input(_))));
}

#[test]
fn nvlm_prompt_tokenizes_tile_tags_as_text() {
    let processor = processor("nvlm-d");
    let encoding =
        processor.encode(&[Message::user().image(image("wide.png")).text("Hi")], &ProcessOptions::default()).unwrap();
    let text = processor.tokenizer().decode(&encoding.input_ids, false).unwrap();
    assert!(text.contains("<Image><tile_1><|vision_pad|>"), "{text}");
    assert!(text.contains("<tile_global_thumbnail>"), "{text}");
    // The tags are not special tokens: BPE splits them into several ordinary tokens.
    let tag = processor.tokenizer().encode("<tile_1>").unwrap();
    assert!(tag.len() > 1 && tag.iter().all(|&id| !processor.tokenizer().is_special(id)));
}

// ------------------------------------------------------------------------------------------------
// Bad input: a typed error before any model compute.
// ------------------------------------------------------------------------------------------------

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).unwrap()
}

#[test]
fn unreadable_image_is_an_image_error() {
    assert!(matches!(Image::from_bytes(b"definitely not an image"), Err(Error::Image { .. })));
    let missing = Image::open(fixtures().join("images/missing.png"));
    assert!(matches!(missing, Err(Error::Io { .. })));
}

#[test]
fn truncated_images_are_image_errors() {
    // (The GIF is cut inside its first frame: a file cut in a later frame still has a whole first one.)
    for (name, keep) in [("photo.png", 2), ("photo.jpg", 2), ("photo.webp", 2), ("photo.bmp", 2), ("animated.gif", 8)] {
        let bytes = image_bytes(name);
        let error = Image::from_bytes(&bytes[..bytes.len() / keep]).err();
        assert!(matches!(error, Some(Error::Image { .. })), "{name}: {error:?}");
    }
}

#[test]
fn zero_sized_image_is_refused() {
    assert!(matches!(Image::from_rgb8(0, 0, Vec::new()), Err(Error::EmptyImage { .. })));
}

/// A PNG whose header claims `width x height` pixels, with no pixel data behind it.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    for chunk in [&b"IDAT"[..], &b"IEND"[..]] {
        png.extend(0u32.to_be_bytes());
        png.extend(chunk);
        png.extend(crc32(chunk).to_be_bytes());
    }
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn decompression_bomb_is_refused_from_the_header() {
    match Image::from_bytes(&png_header(100_000, 100_000)) {
        Err(Error::ImageTooLarge { width: 100_000, height: 100_000, limit, .. }) => assert_eq!(limit, 89_478_485),
        other => panic!("expected ImageTooLarge, got {other:?}"),
    }
    let limits = vlm::processing::ImageLimits { max_pixels: 1000 };
    let small_budget = Image::from_bytes_with_limits(&image_bytes("photo.png"), &limits);
    assert!(matches!(small_budget, Err(Error::ImageTooLarge { width: 80, height: 80, limit: 1000, .. })));
}

#[test]
fn more_placeholders_than_images_is_an_image_count_error() {
    let processor = processor("internvl3-original");
    let messages = [Message::user().image(image("square.png")).text("and <image> here")];
    let error = processor.encode(&messages, &ProcessOptions::default()).unwrap_err();
    assert!(matches!(error, Error::ImageCount { images: 1, placeholders: 2 }), "{error}");
}

#[test]
fn more_images_than_placeholders_is_an_image_count_error() {
    // A text-only template drops the image parts.
    let dir = model_dir("internvl3-hf");
    let config = CheckpointConfig::from_file(&dir.join("config.json")).unwrap();
    let reference = processor("internvl3-hf");
    let template = vlm::processing::ChatTemplate::new(
        "{% for m in messages %}{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endfor %}".into(),
    )
    .unwrap();
    let text_only =
        Processor::new(reference.images().clone(), vlm::processing::Tokenizer::from_dir(&dir).unwrap(), template, 512);
    let _ = config;
    let messages = [Message::user().image(image("square.png")).image(image("tiny.png")).text("Compare.")];
    let error = text_only.encode(&messages, &ProcessOptions::default()).unwrap_err();
    assert!(matches!(error, Error::ImageCount { images: 2, placeholders: 0 }), "{error}");
}

#[test]
fn image_context_tokens_typed_into_the_text_are_refused() {
    let processor = processor("nvlm-d");
    let messages = [Message::user().image(image("tiny.png")).text("<|vision_pad|><|vision_pad|>")];
    let error = processor.encode(&messages, &ProcessOptions::default()).unwrap_err();
    assert!(matches!(error, Error::InputMismatch { image_tokens: 18, image_features: 16 }), "{error}");
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let processor = processor("internvl3-hf");
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(200);
    let error = processor.encode(&[Message::user().text(long)], &ProcessOptions::default()).unwrap_err();
    assert!(matches!(error, Error::ContextOverflow { limit: 512, .. }), "{error}");
}

#[test]
fn empty_conversation_is_refused() {
    let error = processor("internvl3-hf").encode(&[], &ProcessOptions::default()).unwrap_err();
    assert!(matches!(error, Error::Input(_)));
}

#[test]
fn slow_tokenizer_files_give_the_same_ids_as_tokenizer_json() {
    // Rebuild vocab.json + merges.txt from tokenizer.json, drop tokenizer.json, compare encodings.
    let source = model_dir("internvl3-hf");
    let dir = tempfile::tempdir().unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("tokenizer.json")).unwrap()).unwrap();
    // transformers-4 style tokenizer_config.json: special tokens in `added_tokens_decoder`.
    let added: serde_json::Map<String, serde_json::Value> = json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].to_string(), serde_json::json!({"content": t["content"], "special": t["special"]})))
        .collect();
    let config = serde_json::json!({"added_tokens_decoder": added, "eos_token": "<|im_end|>"});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(dir.path().join("vocab.json"), json["model"]["vocab"].to_string()).unwrap();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(pair) => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
            other => other.as_str().unwrap().to_string(),
        })
        .collect();
    std::fs::write(dir.path().join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();

    let fast = vlm::processing::Tokenizer::from_dir(&source).unwrap();
    let slow = vlm::processing::Tokenizer::from_dir(dir.path()).unwrap();
    for text in [
        "<|im_start|>user\nWhat is in this image?<|im_end|>\n",
        "Le chat est sur le canapé.  猫がソファの上に座っています。 0123 +-*/",
        "<img><IMG_CONTEXT><IMG_CONTEXT></img>\n<Image><tile_1><|vision_pad|></Image>",
        "   trailing spaces\n\n\nand newlines   ",
    ] {
        assert_eq!(slow.encode(text).unwrap(), fast.encode(text).unwrap(), "{text:?}");
    }
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|id| id.as_u64().unwrap() as u32).collect()
}

/// InternLM2 checkpoints ship a SentencePiece `tokenizer.model` and no `tokenizer.json`; the
/// reference is the slow `InternLM2Tokenizer` (`tests/fixtures/tokenizer/internlm2.json`).
#[test]
fn internlm2_sentencepiece_tokenizer_matches_the_slow_tokenizer() {
    let tokenizer = vlm::processing::Tokenizer::from_dir(&model_dir("internvl2-internlm2")).unwrap();
    let text = std::fs::read_to_string(fixtures().join("tokenizer/internlm2.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        // The one known difference: the placeholder piece that the checkpoint renames to
        // <|im_end|>, typed by its old name, is that token to SentencePiece but plain text here
        // (a tokenizers vocabulary has one string per id).
        if text.contains("[UNUSED_TOKEN_145]") {
            continue;
        }
        assert_eq!(tokenizer.encode(text).unwrap(), ids(&case["ids"]), "{text:?}");
        checked += 1;
    }
    assert!(checked >= 25, "{checked} cases");
    for case in reference["decodes"].as_array().unwrap() {
        let decoded = tokenizer.decode(&ids(&case["ids"]), true).unwrap();
        assert_eq!(decoded, case["text_skip_special"].as_str().unwrap(), "{:?}", case["ids"]);
    }
    // Special and added tokens sit at the ids tokenizer_config.json gives them.
    for (name, id) in reference["special_ids"].as_object().unwrap() {
        assert_eq!(tokenizer.token_id(name), Some(id.as_u64().unwrap() as u32), "{name}");
    }
}

#[test]
fn internlm2_chat_template_renders_and_tokenizes_as_the_reference() {
    let text = std::fs::read_to_string(fixtures().join("tokenizer/internlm2.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = &reference["chat_template"];
    let processor = processor("internvl2-internlm2");
    let messages = [Message::user().image(image("tiny.png")).text("What is in this image?")];
    let rendered = processor.render(&messages, true).unwrap();
    assert_eq!(rendered, case["rendered"].as_str().unwrap());
    let expanded = case["rendered_expanded"].as_str().unwrap();
    assert_eq!(processor.tokenizer().encode(expanded).unwrap(), ids(&case["input_ids"]));
    // A one-tile image expands to 16 context tokens between <img> and </img>.
    let encoding = processor.encode(&messages, &ProcessOptions::default()).unwrap();
    let context = processor.tokenizer().token_id("<IMG_CONTEXT>").unwrap();
    assert_eq!(encoding.input_ids.iter().filter(|&&id| id == context).count(), 16);
    let eos = processor.end_of_turn_token_ids();
    assert!(eos.contains(&processor.tokenizer().token_id("<|im_end|>").unwrap()), "{eos:?}");
}
