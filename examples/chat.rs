//! A multi-turn chat in the terminal. `/image PATH` attaches an image to your next message,
//! `/reset` starts over, `/quit` (or end of input) leaves.
//!
//! cargo run --release --example chat -- --model OpenGVLab/InternVL3-1B-hf

use std::io::{BufRead, Write};

use anyhow::Context;
use clap::Parser;
use vlm::processing::Content;
use vlm::{GenerationConfig, Image, LoadOptions, Message, Vlm};

#[derive(Parser)]
#[command(about = "Chat with a vision-language model")]
struct Args {
    /// Hugging Face repository id or local checkpoint directory.
    #[arg(long)]
    model: String,
    /// A system message for the whole conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy (default: the checkpoint's).
    #[arg(long)]
    temperature: Option<f32>,
    /// Seed of the sampler.
    #[arg(long)]
    seed: Option<u64>,
    /// Most tiles per image.
    #[arg(long)]
    max_tiles: Option<usize>,
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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut device = vlm::device::from_name(&args.device)?;
    vlm::device::configure_dtype(&mut device, &args.dtype)?;
    let vlm = Vlm::from_pretrained_with(&args.model, &device, &LoadOptions { quantize: args.quantize })
        .with_context(|| format!("loading {}", args.model))?;
    let config = GenerationConfig {
        max_new_tokens: Some(args.max_new_tokens),
        temperature: args.temperature,
        seed: args.seed,
        max_tiles: args.max_tiles,
        ..GenerationConfig::default()
    };
    let start = || args.system.iter().map(|s| Message::system().text(s.as_str())).collect::<Vec<_>>();
    let mut history = start();
    let mut attached: Vec<Image> = Vec::new();

    eprintln!("Type a message. /image PATH attaches an image, /reset starts over, /quit leaves.");
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        write!(stdout, "> ")?;
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" || line == "/exit" {
            break;
        }
        if line == "/reset" {
            history = start();
            attached.clear();
            eprintln!("(conversation cleared)");
            continue;
        }
        if let Some(path) = line.strip_prefix("/image ") {
            match Image::open(path.trim()) {
                Ok(image) => {
                    eprintln!("(attached {}x{} image to your next message)", image.width(), image.height());
                    attached.push(image);
                }
                Err(error) => eprintln!("(cannot use {path}: {error})"),
            }
            continue;
        }

        let mut message = Message::user();
        for image in attached.drain(..) {
            message = message.image(image);
        }
        history.push(message.text(line));
        let mut answer = String::new();
        let result = vlm.stream(&history, &config).and_then(|mut stream| {
            for delta in &mut stream {
                let delta = delta?;
                print!("{delta}");
                let _ = stdout.flush();
                answer.push_str(&delta);
            }
            stream.finish()
        });
        println!();
        match result {
            Ok(_) => history.push(Message::assistant().text(answer)),
            Err(error) => {
                eprintln!("(error: {error}; the message was not added)");
                // Keep the images of a failed turn so they can be sent again.
                if let Some(failed) = history.pop() {
                    attached.extend(failed.content.into_iter().filter_map(|part| match part {
                        Content::Image(image) => Some(image),
                        Content::Text(_) | Content::Video(_) => None,
                    }));
                }
            }
        }
    }
    Ok(())
}
