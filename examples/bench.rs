//! Speed on the standard workload (`PERF.md`): InternVL3-shaped models with random weights at real
//! sizes (no download), or at a tiny size that runs anywhere. Prints one JSON object per size.
//!
//! cargo run --release --example bench -- --size tiny                       # CPU, seconds
//! cargo run --release --features cuda --example bench -- --device cuda --dtype bf16 --size 1b --size 8b
//!
//! Rows: vision + projector for 1, 7 and 13 tiles; time to first token for one image of 13 tiles
//! (and of 1 tile) plus 32 text tokens; decode tokens/s at batch 1 and 16 after a 1-tile prompt;
//! the first call's time to first token (compilation and autotuning included). Each timing is the
//! median of `--runs` after one warm-up, synchronised by reading the result back. `--rows` picks
//! some (`vision_1,ttft_1,decode_bs1` takes minutes on a CPU where all of them take half an hour),
//! `--decode-tokens` sets how many tokens the decode rows generate. `--quantize q8|q4` quantizes
//! the decoder's weights. Each row also reports the parameters' bytes, the bytes a decode step
//! reads (weights of the decoder and output projection), the bandwidth decode achieves at batch
//! 1 (those bytes times tokens/s) and, beside it, the machine's copy bandwidth, measured before
//! and after each run (`decode_bs1_fraction_of_copy`: the median of the runs' shares). Time to
//! first token ends with the first token's logits (the last position's only, as a generation
//! computes them). On the
//! CubeCL devices (wgpu, CUDA) it also counts kernel launches: per decode token, and in the first
//! request with the distinct kernels among them (each compiled on its first launch in a process).

use std::time::{Duration, Instant};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Distribution, FloatDType, Int, Tensor, TensorCreationOptions, TensorData};
use clap::Parser;
use serde_json::{Value, json};
use vlm::Device;
use vlm::device::KernelLaunches;
use vlm::models::{InternVlConfig, InternVlModel, Model, ModelInputs, Pixels};
use vlm::nn::{Activation, NormKind};
use vlm::projector::ProjectorConfig;
use vlm::text::TextConfig;
use vlm::vision::InternVitConfig;

#[derive(Parser)]
#[command(about = "Time vision, prefill and decode on random-weight InternVL3-shaped models")]
struct Args {
    /// tiny, 1b, 2b or 8b; repeat for several (one JSON object each).
    #[arg(long = "size", default_value = "tiny")]
    sizes: Vec<String>,
    /// cpu, cuda, cuda:N (`--features cuda`) or wgpu (`--features wgpu`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Float type of weights and activations: f32, or bf16 / f16 where the backend has them.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed runs per row (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Rows to run, comma-separated: vision_1, vision_7, vision_13, ttft_13, ttft_1, decode_bs1,
    /// decode_bs16, first_ttft (default: all).
    #[arg(long, value_delimiter = ',')]
    rows: Option<Vec<String>>,
    /// Quantize the decoder's weights: q8 or q4.
    #[arg(long)]
    quantize: Option<vlm::QuantKind>,
    /// Tokens the decode rows generate (default: 256 at batch 1 and 128 at batch 16; 64 and 32
    /// for tiny).
    #[arg(long)]
    decode_tokens: Option<usize>,
}

const ROWS: &[&str] =
    &["first_ttft", "vision_1", "vision_7", "vision_13", "ttft_13", "ttft_1", "decode_bs1", "decode_bs16"];

impl Args {
    fn wants(&self, row: &str) -> bool {
        self.rows.as_ref().is_none_or(|rows| rows.iter().any(|r| r == row))
    }
}

/// The decoders of the standard workload: (hidden, layers, heads, KV heads, FFN, tied).
fn decoder(size: &str) -> Option<(usize, usize, usize, usize, usize, bool)> {
    match size {
        "1b" => Some((896, 24, 14, 2, 4864, true)),
        "2b" => Some((1536, 28, 12, 2, 8960, true)),
        "8b" => Some((3584, 28, 28, 4, 18944, false)),
        _ => None,
    }
}

fn config(size: &str) -> anyhow::Result<InternVlConfig> {
    if size == "tiny" {
        return Ok(InternVlConfig::tiny());
    }
    let Some((hidden, layers, heads, kv_heads, ffn, tied)) = decoder(size) else {
        anyhow::bail!("unknown size {size:?} (tiny, 1b, 2b, 8b)");
    };
    // InternViT-300M at 448 px, pixel shuffle 0.5 (256 tokens per tile), Qwen2 decoder.
    let vision = InternVitConfig {
        hidden_size: 1024,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        intermediate_size: 4096,
        norm: NormKind::LayerNorm,
        layer_norm_eps: 1e-6,
        qkv_bias: true,
        qk_norm: false,
        image_size: 448,
        patch_size: 14,
        num_channels: 3,
        hidden_act: Activation::Gelu,
    };
    let text = TextConfig {
        quantization: None,
        vocab_size: 151_674,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: vlm::nn::rope::RopeScaling::None,
        mrope: None,
        qk_norm: false,
        sliding_window: None,
        max_position_embeddings: 32_768,
        qkv_bias: true,
        o_bias: false,
        mlp_bias: false,
        hidden_act: Activation::Silu,
        tie_word_embeddings: tied,
    };
    let projector = ProjectorConfig {
        input_size: vision.hidden_size * 4,
        hidden_size: hidden,
        output_size: hidden,
        bias: true,
        norm: Some(NormKind::LayerNorm),
        norm_eps: 1e-5,
        activation: Activation::Gelu,
    };
    Ok(InternVlConfig { vision, projector, text, image_token_id: Some(151_667), ..InternVlConfig::tiny() })
}

/// Fills every parameter with small random values (timing on zeros flatters some kernels);
/// quantized weights get random levels and f32 scales.
struct Randomize<'a> {
    device: &'a Device,
    /// Type of the module being visited.
    containers: Vec<String>,
    /// State of the generator of random bytes.
    state: u64,
}

impl ModuleMapper for Randomize<'_> {
    fn enter_module(&mut self, _name: &str, container_type: &str) {
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.containers.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let shape = param.lazy_shape();
        let value: Tensor<D> = Tensor::random(shape, Distribution::Normal(0.0, 0.02), self.device);
        let quantized = self.containers.last().is_some_and(|c| c == "Struct:QuantizedWeight");
        Param::initialized(param.id, if quantized { value.cast(FloatDType::F32) } else { value })
    }

    fn map_int<const D: usize>(&mut self, param: Param<Tensor<D, Int>>) -> Param<Tensor<D, Int>> {
        let shape = param.lazy_shape();
        let bytes: Vec<u8> = (0..shape.num_elements())
            .map(|_| {
                self.state = self.state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (self.state >> 56) as u8
            })
            .collect();
        let options = TensorCreationOptions::new(self.device.clone()).with_dtype(burn::tensor::DType::U8);
        Param::initialized(param.id, Tensor::from_data(TensorData::new(bytes, shape), options))
    }
}

/// The machine's copy bandwidth in GB/s (bytes read plus bytes written per second, as STREAM's
/// Copy counts them), every core copying its share of 512 MiB; the best of three. On a shared
/// machine it moves with the neighbours' load: the decode row measures it before and after each
/// run.
fn copy_bandwidth() -> f64 {
    use rayon::prelude::*;
    let len = 512 << 20;
    let source = vec![1u8; len];
    let mut target = vec![0u8; len];
    let chunk = len / rayon::current_num_threads().max(1) / 8;
    (0..4)
        .map(|_| {
            let start = Instant::now();
            target.par_chunks_mut(chunk).zip(source.par_chunks(chunk)).for_each(|(t, s)| t.copy_from_slice(s));
            2.0 * len as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .skip(1)
        .fold(0.0, f64::max)
}

/// Bytes one decode step reads: every decoder weight, and the output projection (the embedding
/// table when tied), but not the embedding table when only one of its rows is looked up.
fn decode_bytes(model: &InternVlModel) -> usize {
    let text = vlm::nn::parameter_bytes(&model.language_model);
    match &model.lm_head {
        Some(head) => {
            text - vlm::nn::parameter_bytes(&model.language_model.embed_tokens) + vlm::nn::parameter_bytes(head)
        }
        None => text,
    }
}

/// Median of `runs` durations that `f` measures, after one warm-up call.
fn median(runs: usize, mut f: impl FnMut() -> anyhow::Result<Duration>) -> anyhow::Result<Duration> {
    f()?;
    let mut times = (0..runs.max(1)).map(|_| f()).collect::<anyhow::Result<Vec<_>>>()?;
    times.sort();
    Ok(times[times.len() / 2])
}

/// How long `f` takes.
fn timed(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn pixels(tiles: usize, config: &InternVlConfig, device: &Device) -> Tensor<4> {
    let side = config.vision.image_size;
    Tensor::random([tiles, 3, side, side], Distribution::Normal(0.0, 1.0), device)
}

/// A prompt of `tiles` tiles of image tokens then 32 text tokens, `batch` times.
fn prompt(model: &InternVlModel, tiles: usize, batch: usize, device: &Device) -> ModelInputs {
    let config = model.config();
    let image_token = config.image_token_id.expect("bench configs set it");
    let text_vocab = (config.text.vocab_size as u32).min(image_token);
    let row: Vec<u32> = std::iter::repeat_n(image_token, tiles * config.tokens_per_tile())
        .chain((0..32u32).map(|i| (i * 7919 + 13) % text_vocab))
        .collect();
    ModelInputs { input_ids: vec![row; batch], pixels: Some(Pixels::Tiles(pixels(tiles * batch, config, device))) }
}

/// Greedy next tokens from the last position's logits (reads them back: a device sync).
/// The greedy next token of each row: the last position's hidden state through the output
/// projection (as the generator does: no logits for the prompt's other positions).
fn next_tokens(model: &Model, hidden: Tensor<3>) -> Vec<u32> {
    let [batch, seq_len, _] = hidden.dims();
    // [batch, 1, vocab] -> [batch]
    let last = model.logits(hidden.narrow(1, seq_len - 1, 1)).argmax(2).reshape([batch]);
    let last: Tensor<1, Int> = last;
    last.into_data().iter::<i64>().map(|id| id as u32).collect()
}

/// Prefill `inputs`, then decode `steps` tokens; returns (time to first token, decode time, kernel
/// launches of the decode steps where `count_launches`).
fn generate(
    model: &Model,
    inputs: &ModelInputs,
    steps: usize,
    count_launches: bool,
) -> anyhow::Result<(Duration, Duration, Option<KernelLaunches>)> {
    let start = Instant::now();
    let batch = inputs.input_ids.len();
    let mut cache = model.new_cache(batch, inputs.input_ids[0].len() + steps + 1);
    let mut tokens = next_tokens(model, model.hidden_states(inputs, &mut cache)?);
    let ttft = start.elapsed();
    let decode_start = Instant::now();
    let ((), launches) = counting_launches(count_launches, || {
        for _ in 0..steps {
            let step = ModelInputs { input_ids: tokens.iter().map(|&t| vec![t]).collect(), pixels: None };
            tokens = next_tokens(model, model.hidden_states(&step, &mut cache)?);
        }
        Ok(())
    })?;
    Ok((ttft, decode_start.elapsed(), launches))
}

/// Runs `f`, counting the kernels it launches when `count` (a CubeCL device: the CPU launches
/// none). `f` must end with a read-back, so that its work has been launched when it returns.
fn counting_launches<T>(
    count: bool,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Option<KernelLaunches>)> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if count {
        let counter = vlm::device::LaunchCounter::start();
        let value = f()?;
        return Ok((value, Some(counter.finish())));
    }
    let _ = count;
    Ok((f()?, None))
}

fn bench(size: &str, args: &Args, device: &Device) -> anyhow::Result<Value> {
    let mut config = config(size)?;
    config.text.quantization = args.quantize;
    let init_start = Instant::now();
    let model = Model::InternVl(config.init(device).map(&mut Randomize { device, containers: Vec::new(), state: 1 }));
    let internvl = model.as_internvl().expect("an InternVL model");
    let bytes_per_token = decode_bytes(internvl);
    let params = model.num_params();
    let init_ms = ms(init_start.elapsed());
    let tiny = size == "tiny";
    let (steps_bs1, steps_bs16) = if tiny { (64, 32) } else { (256, 128) };
    let (steps_bs1, steps_bs16) = args.decode_tokens.map_or((steps_bs1, steps_bs16), |n| (n, n));

    let mut row = json!({
        "size": size,
        "device": args.device,
        "dtype": args.dtype,
        "quantize": args.quantize.map(|kind| format!("{kind:?}").to_lowercase()),
        "params": params,
        "parameter_bytes": model.parameter_bytes(),
        "decode_bytes_per_token": bytes_per_token,
        "init_random_weights_ms": init_ms,
    });
    let count_launches = !vlm::device::is_cpu(device);
    if args.wants("first_ttft") {
        // The very first request, compilation and autotuning included. Reading a weight back first
        // runs the random initialisation, which is not part of the request.
        internvl.language_model.norm.weight.val().sum().into_data();
        let inputs = prompt(internvl, 1, 1, device);
        let (first, launches) = counting_launches(count_launches, || Ok(generate(&model, &inputs, 0, false)?.0))?;
        row["first_ttft_ms_1tile"] = ms(first).into();
        if let Some(launches) = launches {
            row["first_request_kernel_launches"] = launches.launches.into();
            row["first_request_distinct_kernels"] = launches.distinct.into();
        }
    }
    for tiles in [1, 7, 13].into_iter().filter(|tiles| args.wants(&format!("vision_{tiles}"))) {
        let pixel_values = pixels(tiles, &config, device);
        let time = median(args.runs, || {
            timed(|| {
                // The sum reads back one number: the device has finished.
                // On a pool thread, as the model's own entry points run on the CPU.
                vlm::device::on_compute_pool(device, || internvl.image_features(pixel_values.clone()))?
                    .sum()
                    .into_data();
                Ok(())
            })
        })?;
        row[format!("vision_ms_{tiles}tiles")] = ms(time).into();
    }
    for (tiles, key) in [(13, "ttft_ms_13tiles"), (1, "ttft_ms_1tile")] {
        if !args.wants(&format!("ttft_{tiles}")) {
            continue;
        }
        let inputs = prompt(internvl, tiles, 1, device);
        row[key] = ms(median(args.runs, || Ok(generate(&model, &inputs, 0, false)?.0))?).into();
    }
    for (batch, steps, key) in [(1, steps_bs1, "decode_tok_s_bs1"), (16, steps_bs16, "decode_tok_s_bs16")] {
        if !args.wants(&format!("decode_bs{batch}")) {
            continue;
        }
        let inputs = prompt(internvl, 1, batch, device);
        // On the CPU at batch 1 each run is flanked by copy-bandwidth measurements (their mean is
        // that run's copy bandwidth): what the machine streams moves with its neighbours' load.
        let flank = batch == 1 && args.device.starts_with("cpu");
        let mut flanked_runs = Vec::new();
        let decode = median(args.runs, || {
            let before = flank.then(copy_bandwidth);
            let time = generate(&model, &inputs, steps, false)?.1;
            if let Some(before) = before {
                flanked_runs.push((time, (before + copy_bandwidth()) / 2.0));
            }
            Ok(time)
        })?;
        let tokens_per_second = (batch * steps) as f64 / decode.as_secs_f64();
        row[key] = tokens_per_second.into();
        row[format!("{key}_new_tokens")] = steps.into();
        if count_launches && let (_, _, Some(launches)) = generate(&model, &inputs, steps, true)? {
            let per_token = |count: usize| count as f64 / steps.max(1) as f64;
            row[format!("decode_kernel_launches_per_token_bs{batch}")] = per_token(launches.launches).into();
            let by_name: serde_json::Map<String, Value> =
                launches.by_name.iter().map(|(name, count)| (name.clone(), per_token(*count).into())).collect();
            row[format!("decode_kernels_per_token_bs{batch}")] = by_name.into();
        }
        if batch == 1 {
            let gb_per_second = |time: Duration| bytes_per_token as f64 * steps as f64 / time.as_secs_f64() / 1e9;
            row["decode_bs1_gb_s"] = gb_per_second(decode).into();
            if flank {
                // The warm-up run is not counted.
                let runs = &flanked_runs[1..];
                let middle = |mut values: Vec<f64>| {
                    values.sort_by(f64::total_cmp);
                    values[values.len() / 2]
                };
                let fractions: Vec<f64> = runs.iter().map(|&(time, copy)| gb_per_second(time) / copy).collect();
                row["machine_copy_gb_s"] = middle(runs.iter().map(|&(_, copy)| copy).collect()).into();
                row["decode_bs1_fraction_of_copy"] = middle(fractions.clone()).into();
                row["decode_bs1_fraction_of_copy_runs"] = fractions.into();
            }
        }
    }
    Ok(row)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut device = vlm::device::from_name(&args.device)?;
    vlm::device::configure_dtype(&mut device, &args.dtype)?;
    if let Some(unknown) = args.rows.iter().flatten().find(|row| !ROWS.contains(&row.as_str())) {
        anyhow::bail!("unknown row {unknown:?} (rows: {})", ROWS.join(", "));
    }
    for size in &args.sizes {
        println!("{}", bench(size, &args, &device)?);
    }
    Ok(())
}
