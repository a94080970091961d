//! Generation on the committed fixtures: greedy tokens equal transformers' `generate`, the KV cache
//! changes nothing, seeds reproduce, stops stop, streams add up, batches equal single runs.

mod common;

use std::path::Path;
use std::time::Instant;

use common::{Reference, Scratch, model_dir};
use vlm::generation::{GenerationDefaults, Generator};
use vlm::processing::{Encoding, Visual};
use vlm::{GenerationConfig, Image, Message, StopReason, Vlm};

fn vlm(checkpoint: &str) -> Vlm {
    Vlm::from_pretrained(model_dir(checkpoint).to_str().unwrap(), &vlm::device::cpu()).unwrap()
}

fn image(name: &str) -> Image {
    Image::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images").join(name)).unwrap()
}

fn greedy(tokens: usize) -> GenerationConfig {
    GenerationConfig::default().temperature(0.0).max_new_tokens(tokens)
}

/// The parity prompt of a reference as an Encoding (token ids and pixel values as transformers had them).
fn reference_encoding(reference: &Reference) -> Encoding {
    let (shape, pixel_values) = reference.floats("pixel_values");
    let ids = reference.ids("input_ids").concat();
    let (tiles, size) = (shape[0], shape[2]);
    let grid = vlm::processing::Grid { cols: 1, rows: 1 };
    let tokens = ids.len(); // not used by generation
    Encoding {
        input_ids: ids,
        pixel_values,
        visuals: vec![Visual::Tiles { grid, tiles, size, tokens }],
        prompt: String::new(),
    }
}

#[test]
fn greedy_tokens_equal_transformers_generate_for_every_fixture() {
    for (checkpoint, weights) in [
        ("internvl3-hf", "internvl3"),
        ("internvl3-original", "internvl3"),
        ("internvl3-hf-sharded", "internvl3"),
        ("internvl3-hf-bf16", "internvl3-bf16"),
        ("internvl2-llama-untied", "internvl2-llama-untied"),
        ("nvlm-d", "nvlm-d"),
        ("internvl2-internlm2", "internvl2-internlm2"),
        ("internvl-rope-dynamic", "internvl-rope-dynamic"),
        ("internvl-rope-yarn", "internvl-rope-yarn"),
    ] {
        let vlm = vlm(checkpoint);
        let reference = Reference::load(weights);
        let expected = reference.ids("greedy_tokens").concat();
        let prompt = reference_encoding(&reference);
        // transformers generated without stopping at eos; so do we.
        let config = greedy(expected.len()).eos_token_ids(vec![]);
        let defaults = GenerationDefaults::default();
        let generator =
            Generator::new(vlm.model(), vlm.processor().tokenizer(), &[prompt], &[config], &defaults, Instant::now())
                .unwrap();
        let out = generator.finish().unwrap().remove(0);
        assert_eq!(out.token_ids, expected, "{checkpoint}");
        assert_eq!(out.stop_reason, StopReason::MaxNewTokens);
    }
}

fn conversation() -> Vec<Message> {
    vec![Message::user().image(image("wide.png")).text("What is in this image?")]
}

#[test]
fn greedy_with_cache_equals_greedy_without_cache() {
    let vlm = vlm("internvl3-original");
    let config = greedy(10).eos_token_ids(vec![]);
    let cached = vlm.generate(&conversation(), &config).unwrap().token_ids;

    let encoding = vlm.encode(&conversation(), &config).unwrap();
    assert_eq!(cached, greedy_without_cache(&vlm, &encoding, 10));
}

/// Greedy tokens without reuse: every token from a full forward pass over the whole sequence.
fn greedy_without_cache(vlm: &Vlm, encoding: &Encoding, steps: usize) -> Vec<u32> {
    let device = vlm.model().device();
    let mut ids = encoding.input_ids.clone();
    let mut recomputed = Vec::new();
    for _ in 0..steps {
        let inputs = vlm::models::ModelInputs { input_ids: vec![ids.clone()], pixels: encoding.pixels(&device) };
        let mut cache = vlm.model().new_cache(1, ids.len());
        let logits = vlm.model().forward(&inputs, &mut cache).unwrap();
        let [_, len, vocab] = logits.dims();
        let last = logits.narrow(1, len - 1, 1).reshape([vocab]).into_data().try_to_vec::<f32>().unwrap();
        let next = vlm::generation::sampler::argmax(&last);
        recomputed.push(next);
        ids.push(next);
    }
    recomputed
}

fn four_conversations() -> Vec<Vec<Message>> {
    vec![
        vec![Message::user().image(image("wide.png")).text("What is in this image?")],
        vec![Message::user().text("Describe a cat.")],
        vec![
            Message::system().text("Be brief."),
            Message::user().image(image("tiny.png")).image(image("square.png")).text("Compare the two."),
        ],
        vec![Message::user().text("Hi")],
    ]
}

#[test]
fn left_padded_batch_with_cache_equals_recompute_without_cache() {
    let vlm = vlm("internvl3-hf");
    let config = greedy(6).eos_token_ids(vec![]);
    let conversations = four_conversations();
    let batch = vlm.generate_batch(&conversations, &config).unwrap();
    let lengths: Vec<usize> = batch.iter().map(|out| out.prompt_tokens).collect();
    assert!(lengths.iter().any(|&len| len != lengths[0]), "the batch needs padding: {lengths:?}");
    for (conversation, batched) in conversations.iter().zip(&batch) {
        let encoding = vlm.encode(conversation, &config).unwrap();
        assert_eq!(batched.token_ids, greedy_without_cache(&vlm, &encoding, 6));
    }
}

#[test]
fn finished_rows_leave_the_batch_and_the_others_go_on_alone() {
    let vlm = vlm("internvl3-hf");
    let conversations = four_conversations();
    let encodings: Vec<Encoding> = conversations.iter().map(|c| vlm.encode(c, &greedy(1)).unwrap()).collect();
    let configs: Vec<GenerationConfig> =
        [2, 9, 4, 9].into_iter().map(|tokens| greedy(tokens).eos_token_ids(vec![])).collect();
    let defaults = GenerationDefaults::default();
    let tokenizer = vlm.processor().tokenizer();
    let mut generator =
        Generator::new(vlm.model(), tokenizer, &encodings, &configs, &defaults, Instant::now()).unwrap();
    let mut batch_sizes = Vec::new();
    while !generator.is_finished() {
        generator.step().unwrap();
        batch_sizes.push(generator.batch_rows());
    }
    assert_eq!(batch_sizes, vec![4, 3, 3, 2, 2, 2, 2, 2, 0]);
    for (row, (encoding, config)) in encodings.iter().zip(&configs).enumerate() {
        let alone = Generator::new(
            vlm.model(),
            tokenizer,
            std::slice::from_ref(encoding),
            std::slice::from_ref(config),
            &defaults,
            Instant::now(),
        )
        .unwrap()
        .finish()
        .unwrap()
        .remove(0);
        assert_eq!(generator.generation(row).token_ids, alone.token_ids, "row {row}");
    }
}

#[test]
fn padding_does_not_count_against_a_short_prompts_context() {
    let conversations = vec![conversation(), vec![Message::user().text("Describe a cat.")]];
    let long = vlm("internvl3-hf").encode(&conversations[0], &greedy(1)).unwrap().input_ids.len();
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_json("config.json", |config| config["text_config"]["max_position_embeddings"] = (long + 3).into());
    let vlm = Vlm::from_dir(scratch.dir.path(), &vlm::device::cpu()).unwrap();
    let config = greedy(10).eos_token_ids(vec![]);
    let batch = vlm.generate_batch(&conversations, &config).unwrap();
    assert_eq!((batch[0].token_ids.len(), &batch[0].stop_reason), (3, &StopReason::ContextFull));
    let alone = vlm.generate(&conversations[1], &config).unwrap();
    assert_eq!(alone.stop_reason, StopReason::MaxNewTokens);
    assert_eq!(batch[1].token_ids, alone.token_ids);
    assert_eq!(batch[1].stop_reason, alone.stop_reason);
}

#[test]
fn unseeded_sampling_differs_between_calls() {
    let vlm = vlm("internvl3-hf");
    let config = GenerationConfig::default().temperature(1.0).top_k(0).max_new_tokens(12).eos_token_ids(vec![]);
    let first = vlm.generate(&conversation(), &config).unwrap().token_ids;
    let second = vlm.generate(&conversation(), &config).unwrap().token_ids;
    assert_ne!(first, second, "two unseeded runs drew the same 12 tokens from a 410-token vocabulary");
}

#[test]
fn nan_weights_are_an_error_naming_the_stage() {
    for (tensor, stage) in [
        ("language_model.model.norm.weight", "decoder logits"),
        ("multi_modal_projector.linear_2.bias", "vision tower and projector"),
    ] {
        let scratch = Scratch::of("internvl3-hf");
        scratch.edit_floats(tensor, |_, values| values[0] = f32::NAN);
        let vlm = Vlm::from_dir(scratch.dir.path(), &vlm::device::cpu()).unwrap();
        let error = vlm.generate(&conversation(), &greedy(4)).unwrap_err();
        assert!(matches!(error, vlm::Error::NonFinite { stage: got } if got == stage), "{tensor}: {error}");
    }
}

#[test]
fn checkpoint_eos_stops_generation_by_default() {
    let free = vlm("internvl3-hf").generate(&conversation(), &greedy(8).eos_token_ids(vec![])).unwrap();
    let eos = free.token_ids[3];
    let first = free.token_ids.iter().position(|&t| t == eos).unwrap();
    let scratch = Scratch::of("internvl3-hf");
    scratch.edit_json("generation_config.json", |config| config["eos_token_id"] = eos.into());
    let vlm = Vlm::from_dir(scratch.dir.path(), &vlm::device::cpu()).unwrap();
    let stopped = vlm.generate(&conversation(), &greedy(8)).unwrap();
    assert_eq!(stopped.stop_reason, StopReason::Eos);
    assert_eq!(stopped.token_ids, free.token_ids[..=first]);
}

/// A copy of the untied-lm_head fixture whose output row for `token` is twice that of the token
/// the model picks at step 2, so the model emits `token` within three steps.
fn emitting(token: &str) -> (Scratch, u32) {
    let free = vlm("internvl2-llama-untied").generate(&conversation(), &greedy(3).eos_token_ids(vec![])).unwrap();
    let scratch = Scratch::of("internvl2-llama-untied");
    let id = vlm("internvl2-llama-untied").processor().tokenizer().token_id(token).unwrap();
    let picked = free.token_ids[2] as usize;
    scratch.edit_floats("language_model.lm_head.weight", |shape, rows| {
        let width = shape[1];
        for i in 0..width {
            rows[id as usize * width + i] = 2.0 * rows[picked * width + i];
        }
    });
    (scratch, id)
}

#[test]
fn without_generation_config_the_templates_end_of_turn_token_stops_generation() {
    let (scratch, im_end) = emitting("<|im_end|>");
    std::fs::remove_file(scratch.path("generation_config.json")).unwrap();
    let vlm = Vlm::from_dir(scratch.dir.path(), &vlm::device::cpu()).unwrap();
    assert!(vlm.generation_defaults().eos_token_id.contains(&im_end));
    let free = vlm.generate(&conversation(), &greedy(8).eos_token_ids(vec![])).unwrap();
    let first = free.token_ids.iter().position(|&t| t == im_end).expect("the edited model emits <|im_end|>");
    let stopped = vlm.generate(&conversation(), &greedy(8)).unwrap();
    assert_eq!(stopped.stop_reason, StopReason::Eos);
    assert_eq!(stopped.token_ids, free.token_ids[..=first]);
    // The transformers-layout template (structured content) ends its turns the same way.
    let scratch = Scratch::of("internvl3-hf");
    std::fs::remove_file(scratch.path("generation_config.json")).unwrap();
    let vlm = Vlm::from_dir(scratch.dir.path(), &vlm::device::cpu()).unwrap();
    assert!(vlm.generation_defaults().eos_token_id.contains(&im_end));
}

#[test]
fn a_stop_string_that_is_a_special_token_stops_generation() {
    let (scratch, im_end) = emitting("<|im_end|>");
    let vlm = Vlm::from_dir(scratch.dir.path(), &vlm::device::cpu()).unwrap();
    let free = vlm.generate(&conversation(), &greedy(8).eos_token_ids(vec![])).unwrap();
    let first = free.token_ids.iter().position(|&t| t == im_end).expect("the edited model emits <|im_end|>");
    let stopped = vlm.generate(&conversation(), &greedy(8).eos_token_ids(vec![]).stop("<|im_end|>")).unwrap();
    assert_eq!(stopped.stop_reason, StopReason::StopString("<|im_end|>".into()));
    assert_eq!(stopped.token_ids, free.token_ids[..=first]);
    assert_eq!(stopped.text, vlm.processor().tokenizer().decode(&free.token_ids[..first], true).unwrap());
}

#[test]
fn truncated_cache_recomputes_the_same_step() {
    let vlm = vlm("internvl3-hf");
    let encoding = vlm.encode(&conversation(), &greedy(1)).unwrap();
    let device = vlm.model().device();
    let model = vlm.model();
    let prompt =
        vlm::models::ModelInputs { input_ids: vec![encoding.input_ids.clone()], pixels: encoding.pixels(&device) };
    let mut cache = model.new_cache(1, encoding.input_ids.len() + 2);
    model.forward(&prompt, &mut cache).unwrap();
    let filled = cache.len();
    let step = |token: u32, cache: &mut vlm::nn::KvCache| {
        let inputs = vlm::models::ModelInputs { input_ids: vec![vec![token]], pixels: None };
        model.forward(&inputs, cache).unwrap().into_data().try_to_vec::<f32>().unwrap()
    };
    let first = step(7, &mut cache);
    let other = step(9, &mut cache);
    cache.truncate(filled).unwrap();
    assert_eq!(cache.len(), filled);
    assert_eq!(step(7, &mut cache), first);
    assert_ne!(first, other);
}

#[test]
fn same_seed_gives_the_same_sampled_tokens() {
    let vlm = vlm("internvl3-hf");
    let sample = |seed| {
        GenerationConfig::default().temperature(1.0).top_k(0).max_new_tokens(12).seed(seed).eos_token_ids(vec![])
    };
    let first = vlm.generate(&conversation(), &sample(5)).unwrap().token_ids;
    let again = vlm.generate(&conversation(), &sample(5)).unwrap().token_ids;
    let other = vlm.generate(&conversation(), &sample(6)).unwrap().token_ids;
    assert_eq!(first, again);
    assert_ne!(first, other, "two seeds drew the same 12 tokens from a 410-token vocabulary");
}

#[test]
fn eos_stops_generation_and_is_not_in_the_text() {
    let vlm = vlm("internvl3-hf");
    let free = vlm.generate(&conversation(), &greedy(8).eos_token_ids(vec![])).unwrap();
    let eos = free.token_ids[3];
    let first = free.token_ids.iter().position(|&t| t == eos).unwrap();
    let stopped = vlm.generate(&conversation(), &greedy(8).eos_token_ids(vec![eos])).unwrap();
    assert_eq!(stopped.stop_reason, StopReason::Eos);
    assert_eq!(stopped.token_ids, free.token_ids[..=first]);
    let before = vlm.processor().tokenizer().decode(&free.token_ids[..first], true).unwrap();
    assert_eq!(stopped.text, before);
}

#[test]
fn checkpoint_eos_from_generation_config_is_used_by_default() {
    let vlm = vlm("internvl3-hf");
    let im_end = vlm.processor().tokenizer().token_id("<|im_end|>").unwrap();
    assert!(vlm.generation_defaults().eos_token_id.contains(&im_end));
}

#[test]
fn stop_string_ends_the_text_before_it() {
    let vlm = vlm("internvl3-hf");
    let free = vlm.generate(&conversation(), &greedy(16).eos_token_ids(vec![])).unwrap();
    let chars: Vec<char> = free.text.chars().collect();
    assert!(chars.len() >= 6, "need some text to cut: {:?}", free.text);
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = free.text.find(&stop).unwrap();
    let stopped = vlm.generate(&conversation(), &greedy(16).eos_token_ids(vec![]).stop(stop.clone())).unwrap();
    assert_eq!(stopped.stop_reason, StopReason::StopString(stop.clone()));
    assert_eq!(stopped.text, free.text[..cut]);
    // The ids are the shortest prefix of the free run whose text holds the stop string.
    let ids = &stopped.token_ids;
    assert_eq!(ids[..], free.token_ids[..ids.len()]);
    let tokenizer = vlm.processor().tokenizer();
    assert!(tokenizer.decode(ids, true).unwrap().contains(&stop));
    assert!(!tokenizer.decode(&ids[..ids.len() - 1], true).unwrap().contains(&stop));
}

#[test]
fn max_new_tokens_is_exact() {
    let vlm = vlm("nvlm-d");
    let out = vlm.generate(&conversation(), &greedy(5).eos_token_ids(vec![])).unwrap();
    assert_eq!(out.token_ids.len(), 5);
    assert_eq!(out.stop_reason, StopReason::MaxNewTokens);
    assert!(out.prompt_tokens > 16);
    assert!(out.timings.time_to_first_token >= out.timings.prefill);
}

#[test]
fn concatenated_stream_equals_the_full_text() {
    let vlm = vlm("internvl2-llama-untied");
    let config = greedy(24).eos_token_ids(vec![]);
    let full = vlm.generate(&conversation(), &config).unwrap();
    let mut stream = vlm.stream(&conversation(), &config).unwrap();
    let mut text = String::new();
    let mut deltas = 0;
    for delta in &mut stream {
        let delta = delta.unwrap();
        // (A random model can emit byte tokens that never form a character; those decode to U+FFFD
        // in the full text too. Splitting of real characters is checked below.)
        assert!(!delta.is_empty());
        text.push_str(&delta);
        deltas += 1;
    }
    let out = stream.finish().unwrap();
    assert_eq!(text, full.text);
    assert_eq!(out.token_ids, full.token_ids);
    assert!(deltas > 1);
}

#[test]
fn stream_never_splits_a_multibyte_character() {
    // Byte-level BPE pieces of "猫がソファ" cover partial characters; decoding them one at a time
    // must only ever yield whole characters.
    let vlm = vlm("internvl3-hf");
    let tokenizer = vlm.processor().tokenizer();
    let ids = tokenizer.encode("猫がソファの上に座っています。图片里有什么？").unwrap();
    let mut decoder = vlm::generation::IncrementalDecoder::new();
    let mut text = String::new();
    for id in ids {
        if let Some(delta) = decoder.push(tokenizer, id).unwrap() {
            assert!(!delta.contains('\u{FFFD}'), "{delta:?}");
            text.push_str(&delta);
        }
    }
    assert_eq!(text, "猫がソファの上に座っています。图片里有什么？");
}

#[test]
fn batch_of_different_conversations_equals_running_them_one_by_one() {
    let vlm = vlm("internvl3-hf");
    let conversations = vec![
        vec![Message::user().image(image("wide.png")).text("What is in this image?")],
        vec![Message::user().text("Describe a cat.")],
        vec![
            Message::system().text("Be brief."),
            Message::user().image(image("tiny.png")).image(image("square.png")).text("Compare the two."),
        ],
    ];
    let config = greedy(10).eos_token_ids(vec![]);
    let batch = vlm.generate_batch(&conversations, &config).unwrap();
    for (conversation, batched) in conversations.iter().zip(&batch) {
        let single = vlm.generate(conversation, &config).unwrap();
        assert_eq!(batched.token_ids, single.token_ids);
        assert_eq!(batched.text, single.text);
        assert_eq!(batched.prompt_tokens, single.prompt_tokens);
    }
}

#[test]
fn invalid_settings_fail_before_any_compute() {
    let vlm = vlm("internvl3-hf");
    let error = vlm.generate(&conversation(), &GenerationConfig::default().top_p(2.0)).unwrap_err();
    assert!(matches!(error, vlm::Error::Input(_)), "{error}");
}

/// What the GPU devices do to keep decode shapes fixed, checked on the CPU: attention over every
/// slot of the cache (unwritten ones masked) gives the logits of attention over the written ones,
/// for a prompt and 8 cached steps.
#[test]
fn attention_over_the_whole_capacity_gives_the_same_logits() {
    let vlm = vlm("internvl3-hf");
    let reference = Reference::load("internvl3");
    let device = vlm::device::cpu();
    let inputs = reference_encoding(&reference).to_model_inputs(&device);
    let model = vlm.model();
    let capacity = inputs.input_ids[0].len() + 16;
    let mut exact = model.new_cache(1, capacity);
    let mut fixed = model.new_cache(1, capacity).with_fixed_shapes(true);
    let mut step = inputs;
    for _ in 0..9 {
        let a = model.forward(&step, &mut exact).unwrap();
        let b = model.forward(&step, &mut fixed).unwrap();
        let [_, len, vocab] = a.dims();
        let (a, b) = (a.into_data().try_to_vec::<f32>().unwrap(), b.into_data().try_to_vec::<f32>().unwrap());
        let gap = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(gap <= 1e-5, "logits differ by {gap}");
        let token = vlm::generation::sampler::argmax(&a[(len - 1) * vocab..]);
        step = vlm::models::ModelInputs { input_ids: vec![vec![token]], pixels: None };
    }
}
