//! Describe one or more images, or a video given as frames: stream the model's answer, or print
//! one JSON object with `--json`.
//!
//! cargo run --release --example describe -- --model OpenGVLab/InternVL3-1B-hf --image street.jpg \
//!     --prompt "What is happening here?"
//!
//! This command-line interface is relied on by scripts: keep it stable.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use vlm::processing::Video;
use vlm::{GenerationConfig, Image, LoadOptions, Message, Vlm};

#[derive(Parser)]
#[command(about = "Describe images with a vision-language model")]
struct Args {
    /// Hugging Face repository id or local checkpoint directory.
    #[arg(long)]
    model: String,
    /// An image file (JPEG, PNG, WebP, GIF, BMP); repeat for several, in order.
    #[arg(long = "image")]
    images: Vec<String>,
    /// A directory of video frames (image files, taken in file-name order), for checkpoints that
    /// take video (Qwen-VL); the frames are used as given.
    #[arg(long)]
    video_frames: Option<String>,
    /// The rate the frames were sampled at, in frames per second (with --video-frames).
    #[arg(long, default_value_t = 2.0)]
    fps: f64,
    /// The question or instruction.
    #[arg(long, default_value = "Describe this image in detail.")]
    prompt: String,
    /// Most tokens to generate (default: the checkpoint's, else 256).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 means greedy (default: the checkpoint's).
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    top_p: Option<f32>,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Penalty for tokens already in the sequence (1 disables).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Seed of the sampler.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    stops: Vec<String>,
    /// Most tiles per image (InternVL).
    #[arg(long)]
    max_tiles: Option<usize>,
    /// Most pixels an image is resized to (Qwen-VL).
    #[arg(long)]
    max_pixels: Option<u64>,
    /// cpu, cuda, cuda:N (`--features cuda`) or wgpu (`--features wgpu`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Float dtype of weights and compute: f32, f16 (half the memory) or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Quantize the decoder's weights as they load: q8 or q4 (8- or 4-bit blocks; less memory,
    /// faster CPU decode; see the README for the accuracy cost).
    #[arg(long)]
    quantize: Option<vlm::QuantKind>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut device = vlm::device::from_name(&args.device)?;
    vlm::device::configure_dtype(&mut device, &args.dtype)?;
    let vlm = Vlm::from_pretrained_with(&args.model, &device, &LoadOptions { quantize: args.quantize })
        .with_context(|| format!("loading {}", args.model))?;

    let mut message = Message::user();
    for path in &args.images {
        message = message.image(Image::open(path)?);
    }
    if let Some(dir) = &args.video_frames {
        message = message.video(Video::open_dir(dir, args.fps).with_context(|| format!("reading frames from {dir}"))?);
    }
    let messages = [message.text(args.prompt.as_str())];

    let mut config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        max_tiles: args.max_tiles,
        max_pixels: args.max_pixels,
        ..GenerationConfig::default()
    };
    config.stop = args.stops;

    let out = if args.json {
        vlm.generate(&messages, &config)?
    } else {
        let mut stream = vlm.stream(&messages, &config)?;
        let mut stdout = std::io::stdout();
        for delta in &mut stream {
            write!(stdout, "{}", delta?)?;
            stdout.flush()?;
        }
        writeln!(stdout)?;
        stream.finish()?
    };

    let timings = &out.timings;
    if args.json {
        let json = serde_json::json!({
            "text": out.text,
            "token_ids": out.token_ids,
            "prompt_tokens": out.prompt_tokens,
            "stop_reason": out.stop_reason.to_string(),
            "timings": {
                "ttft_ms": timings.time_to_first_token.as_secs_f64() * 1e3,
                "prefill_ms": timings.prefill.as_secs_f64() * 1e3,
                "decode_ms": timings.decode.as_secs_f64() * 1e3,
                "prefill_tokens_per_s": timings.prefill_tokens_per_second(),
                "decode_tokens_per_s": timings.decode_tokens_per_second(),
            },
        });
        println!("{json}");
    } else {
        eprintln!(
            "[{} prompt tokens, {} generated, stop: {}; first token after {:.0} ms, {:.1} tokens/s]",
            out.prompt_tokens,
            out.token_ids.len(),
            out.stop_reason,
            timings.time_to_first_token.as_secs_f64() * 1e3,
            timings.decode_tokens_per_second()
        );
    }
    Ok(())
}
