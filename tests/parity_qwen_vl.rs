//! Parity of the Qwen-VL families with transformers on the committed fixtures
//! (`scripts/fixtures_qwen_vl.py`): the vision tower (before and after the merger, DeepStack
//! features), the multimodal positions, the prompt logits, and every cached greedy step, for
//! single images, two images, a left-padded batch, a video, and an image with a video.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::{Case, Reference, model_dir, relative_error};
use vlm::models::{PatchGrid, Pixels, QwenVlModel, QwenVlVariant};
use vlm::vision::qwen_grid::VisualGrid;

const TOLERANCE: f32 = 1e-4;

/// (checkpoint, reference weights, cases).
const CASES: &[(&str, &str, &[&str])] = &[
    ("qwen2_5-vl", "qwen2_5-vl", &["single", "two_images", "batch", "video"]),
    ("qwen2_5-vl-hf5", "qwen2_5-vl", &["single"]),
    ("qwen2_5-vl-tied", "qwen2_5-vl-tied", &["single"]),
    ("qwen3-vl", "qwen3-vl", &["single", "two_images", "batch", "video", "image_video"]),
];

fn load(checkpoint: &str) -> QwenVlModel {
    let (_, model) =
        vlm::loader::load(&model_dir(checkpoint), &vlm::device::cpu()).unwrap_or_else(|e| panic!("{checkpoint}: {e}"));
    match model {
        vlm::models::Model::QwenVl(model) => model,
        other => panic!("{checkpoint} loaded as {other:?}"),
    }
}

/// The pixels of a reference case as the Qwen-VL model takes them.
trait QwenPixels {
    fn pixels(&self, model: &QwenVlModel) -> Option<Pixels>;
}

impl QwenPixels for Case<'_> {
    /// The processor's patches (images, then the video when both are there, as their tokens come
    /// in these fixtures' prompts) as the model takes them, with their grids.
    fn pixels(&self, model: &QwenVlModel) -> Option<Pixels> {
        let (mean, std) = match model.config().variant {
            QwenVlVariant::Qwen2_5 => {
                (vlm::processing::Normalization::OPENAI_CLIP.mean, vlm::processing::Normalization::OPENAI_CLIP.std)
            }
            QwenVlVariant::Qwen3 => ([0.5; 3], [0.5; 3]),
        };
        let mut values = Vec::new();
        let mut visuals = Vec::new();
        let mut width = 0;
        for (levels, grids, video) in
            [("pixel_values_u8", "image_grid_thw", false), ("pixel_values_videos_u8", "video_grid_thw", true)]
        {
            if !self.has(levels) {
                continue;
            }
            let (shape, bytes) = self.reference.bytes(&self.key(levels));
            width = shape[1];
            let per_channel = width / 3;
            // transformers' fused normalisation: (level - mean * 255) / (std * 255), in f32.
            values.extend(bytes.iter().enumerate().map(|(i, &level)| {
                let c = (i % width) / per_channel;
                (f32::from(level) - mean[c] * 255.0) / (std[c] * 255.0)
            }));
            let seconds = video.then(|| {
                if self.has("second_per_grid_ts") { f64::from(self.floats("second_per_grid_ts").1[0]) } else { 1.0 }
            });
            for thw in self.ints(grids).1.chunks(3) {
                let grid = VisualGrid { t: thw[0] as usize, h: thw[1] as usize, w: thw[2] as usize };
                visuals.push(PatchGrid { grid, video_seconds_per_patch: seconds });
            }
        }
        if visuals.is_empty() {
            return None;
        }
        let rows = values.len() / width;
        let values = Tensor::from_data(TensorData::new(values, [rows, width]), &model.language_model.device());
        Some(Pixels::Patches { values, visuals })
    }
}

fn cases() -> impl Iterator<Item = (&'static str, QwenVlModel, Reference, &'static str)> {
    CASES.iter().flat_map(|&(checkpoint, weights, names)| {
        names.iter().map(move |&name| (checkpoint, load(checkpoint), Reference::load(weights), name))
    })
}

#[test]
fn vision_tower_and_merger_match_transformers() {
    for (checkpoint, model, reference, name) in cases() {
        let case = Case { reference: &reference, name };
        let Some(Pixels::Patches { values, visuals }) = case.pixels(&model) else { continue };
        let output = model.vision_features(values, &visuals).unwrap();
        // Images and videos go through the tower together; compare each part.
        let images: usize =
            visuals.iter().filter(|v| v.video_seconds_per_patch.is_none()).map(|v| v.grid.patches() / 4).sum();
        let mut checks = vec![("image_embeds", 0, images, output.embeds.clone())];
        if case.has("video_embeds") {
            let videos = output.embeds.dims()[0] - images;
            checks.push(("video_embeds", images, videos, output.embeds.clone()));
        }
        for (k, features) in output.deepstack.iter().enumerate() {
            checks.push((["deepstack_0", "deepstack_1"][k], 0, images, features.clone()));
            if case.has("video_deepstack_0") {
                let videos = features.dims()[0] - images;
                checks.push((["video_deepstack_0", "video_deepstack_1"][k], images, videos, features.clone()));
            }
        }
        for (tensor, start, rows, actual) in checks {
            if !case.has(tensor) || rows == 0 {
                continue;
            }
            let error = relative_error(actual.narrow(0, start, rows), &case.floats(tensor));
            eprintln!("{checkpoint} {name}: {tensor} relative error {error:e}");
            assert!(error <= TOLERANCE, "{checkpoint} {name}: {tensor} relative error {error:e}");
        }
        if case.has("vision_hidden") && !case.has("video_embeds") {
            let error = relative_error(output.hidden_state, &case.floats("vision_hidden"));
            eprintln!("{checkpoint} {name}: vision hidden state (window order) relative error {error:e}");
            assert!(error <= TOLERANCE, "{checkpoint} {name}: vision hidden relative error {error:e}");
        }
    }
}

#[test]
fn multimodal_positions_match_get_rope_index() {
    for (checkpoint, model, reference, name) in cases() {
        let case = Case { reference: &reference, name };
        let visuals = match case.pixels(&model) {
            Some(Pixels::Patches { visuals, .. }) => visuals,
            _ => Vec::new(),
        };
        let ids = case.ids("input_ids");
        let prompt = model.prompt_positions(&ids, &case.padding(), &visuals).unwrap();
        let (positions, offsets) = (prompt.positions, prompt.offsets);
        let (shape, expected) = case.ints("position_ids"); // [3, batch, len]
        let [_, batch, len] = [shape[0], shape[1], shape[2]];
        for b in 0..batch {
            for (i, rows) in positions[b].iter().enumerate() {
                let want: Vec<i64> = (0..3).map(|r| expected[(r * batch + b) * len + i]).collect();
                assert_eq!(rows.map(|p| p as i64).to_vec(), want, "{checkpoint} {name}: row {b} token {i}");
            }
        }
        // The first decode step continues at the last prompt position + 1 on all rows.
        let (_, decode) = case.ints("decode_position_ids"); // [steps - 1, 3, batch]
        for b in 0..batch {
            let unpadded = (len - case.padding()[b]) as i64;
            // Step 1 feeds the token at slot len: its position is len - pad + offset.
            assert_eq!(unpadded + offsets[b], decode[b], "{checkpoint} {name}: row {b} first decode position");
        }
    }
}

#[test]
fn logits_and_every_cached_greedy_step_match_transformers() {
    for (checkpoint, model, reference, name) in cases() {
        let case = Case { reference: &reference, name };
        common::check_logits_and_greedy_steps(
            checkpoint,
            &case,
            case.pixels(&model),
            TOLERANCE,
            |batch, capacity| model.new_cache(batch, capacity),
            |inputs, cache| model.logits(model.hidden_states(inputs, cache).unwrap()),
        );
    }
}
