//! Accuracy benchmarks: answer every item of a JSONL benchmark, score it with its metric, and
//! summarise; shard the work over a Slurm job array and merge the shards.
//!
//! cargo run --release --example eval -- run --model OpenGVLab/InternVL3-1B-hf \
//!     --benchmark bench.jsonl --output results/
//! cargo run --release --example eval -- merge --benchmark bench.jsonl --output results/
//!
//! `run` appends one line per item to `OUTPUT/predictions.I-of-N.jsonl` as soon as the item is
//! answered, and skips items already there, so a crashed or preempted run picks up where it left
//! off. Inside a Slurm job array the shard comes from `SLURM_ARRAY_TASK_*` unless `--shard` is given.
//! The benchmark format and the metrics are described in `vlm::eval`.

mod progress;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::Value;
use vlm::eval::{Benchmark, Item, Record, ResultsWriter, Shard, Summary};
use vlm::processing::Encoding;
use vlm::{Generation, GenerationConfig, Image, LoadOptions, Message, Vlm};

use progress::Progress;

#[derive(Parser)]
#[command(about = "Score a vision-language model on a JSONL benchmark")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer and score the items of a benchmark (or of one shard of it).
    Run(RunArgs),
    /// Combine the shards' results into `predictions.jsonl` and `summary.json`; fails (exit 1) when
    /// items are missing or answered twice.
    Merge(MergeArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Hugging Face repository id or local checkpoint directory.
    #[arg(long)]
    model: String,
    /// The benchmark, one JSON item per line.
    #[arg(long)]
    benchmark: PathBuf,
    /// Folder for the results files and summaries.
    #[arg(long)]
    output: PathBuf,
    /// This process's part, `I/N` (0-based); default: from SLURM_ARRAY_TASK_* in a job array, else 0/1.
    #[arg(long)]
    shard: Option<Shard>,
    /// Items generated together in one batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Most tiles per image (bounds memory on large images).
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
    /// Run again the items whose earlier attempt failed (their records are removed first).
    #[arg(long)]
    retry_failed: bool,
    /// Stop after answering this many items (a smoke test; run again to go on).
    #[arg(long)]
    limit: Option<usize>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// The benchmark the shards answered.
    #[arg(long)]
    benchmark: PathBuf,
    /// The folder holding the shards' `predictions.I-of-N.jsonl`.
    #[arg(long)]
    output: PathBuf,
}

fn main() -> anyhow::Result<ExitCode> {
    match Args::parse().command {
        Command::Run(args) => run(&args),
        Command::Merge(args) => {
            let benchmark = Benchmark::read(&args.benchmark)?;
            merge(&benchmark, &args.output)
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let benchmark = Benchmark::read(&args.benchmark)?;
    let shard = match args.shard {
        Some(shard) => shard,
        None => Shard::from_slurm_env()?.unwrap_or(Shard::WHOLE),
    };
    let (mut writer, existing) =
        ResultsWriter::open(&vlm::eval::shard_results_path(&args.output, shard), args.retry_failed)?;
    let done: HashSet<&str> = existing.iter().map(|record| record.id.as_str()).collect();
    let mine: Vec<&Item> =
        benchmark.items.iter().enumerate().filter(|(position, _)| shard.contains(*position)).map(|(_, i)| i).collect();
    let todo: Vec<&Item> = mine.iter().copied().filter(|item| !done.contains(item.id.as_str())).collect();
    let stops_early = args.limit.is_some_and(|limit| limit < todo.len());
    let todo = &todo[..todo.len().min(args.limit.unwrap_or(usize::MAX))];
    let label = format!("[{} shard {shard}]", args.benchmark.display());
    if !args.quiet {
        eprintln!("{label} {} items, {} answered by an earlier run, {} to go", mine.len(), done.len(), todo.len());
    }

    if !todo.is_empty() {
        let mut device = vlm::device::from_name(&args.device)?;
        vlm::device::configure_dtype(&mut device, &args.dtype)?;
        let vlm = Vlm::from_pretrained_with(&args.model, &device, &LoadOptions { quantize: args.quantize })
            .with_context(|| format!("loading {}", args.model))?;
        let config = GenerationConfig { max_tiles: args.max_tiles, ..GenerationConfig::default() }
            .temperature(0.0)
            .max_new_tokens(args.max_new_tokens);
        let score_sum = existing.iter().map(|record| record.score).sum();
        let mut progress = Progress::new(label, mine.len(), done.len(), score_sum, args.quiet);
        for batch in todo.chunks(args.batch_size) {
            for record in answer(&vlm, batch, &config) {
                writer.append(&record)?;
                progress.advance(record.score);
            }
        }
        progress.finish();
    }

    let records = vlm::eval::read_records(writer.path())?;
    let expected: Vec<&str> = mine.iter().map(|item| item.id.as_str()).collect();
    let (_, summary) = Summary::compute(&benchmark.path, &expected, records, vec![writer.path().to_path_buf()]);
    drop(writer);
    write_json(&args.output.join(format!("summary.{}.json", shard.tag())), &summary, Some(&args.model))?;
    if stops_early {
        eprintln!("stopped after --limit {} items; run again to go on", todo.len());
    } else if shard == Shard::WHOLE {
        return merge(&benchmark, &args.output);
    }
    report(&summary);
    Ok(ExitCode::SUCCESS)
}

/// Answers a batch of items: each is encoded alone (an item that cannot be, say for an unreadable
/// image, gets a failed record), the rest are generated together. If the batch fails as a whole,
/// its items run one by one so that only the culprit fails.
fn answer(vlm: &Vlm, items: &[&Item], config: &GenerationConfig) -> Vec<Record> {
    let started = Instant::now();
    let mut records: Vec<Option<Record>> = vec![None; items.len()];
    let mut encoded: Vec<(usize, Encoding)> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match messages(item).and_then(|messages| vlm.encode(&messages, config)) {
            Ok(encoding) => encoded.push((index, encoding)),
            Err(error) => records[index] = Some(failed(item, &error, started)),
        }
    }
    let encodings: Vec<Encoding> = encoded.iter().map(|(_, encoding)| encoding.clone()).collect();
    match vlm.generate_encoded(&encodings, config, started) {
        Ok(generations) => {
            for ((index, _), generation) in encoded.iter().zip(generations) {
                records[*index] = Some(scored(items[*index], generation, started));
            }
        }
        Err(_) if encoded.len() > 1 => {
            for (index, encoding) in encoded {
                let started = Instant::now();
                records[index] = Some(match vlm.generate_encoded(&[encoding], config, started) {
                    Ok(mut generation) => scored(items[index], generation.remove(0), started),
                    Err(error) => failed(items[index], &error, started),
                });
            }
        }
        Err(error) => {
            for (index, _) in encoded {
                records[index] = Some(failed(items[index], &error, started));
            }
        }
    }
    records.into_iter().flatten().collect()
}

/// The item as one user message: its images, then its prompt.
fn messages(item: &Item) -> vlm::Result<Vec<Message>> {
    let mut message = Message::user();
    for path in item.image_paths() {
        message = message.image(Image::open(path)?);
    }
    Ok(vec![message.text(item.prompt_text())])
}

fn scored(item: &Item, generation: Generation, started: Instant) -> Record {
    let scored = vlm::eval::score(item, &generation.text);
    Record {
        prediction: generation.text,
        parsed: scored.parsed,
        score: scored.score,
        prompt_tokens: generation.prompt_tokens,
        generated_tokens: generation.token_ids.len(),
        stop_reason: generation.stop_reason.to_string(),
        ..record(item, started)
    }
}

fn failed(item: &Item, error: &vlm::Error, started: Instant) -> Record {
    Record { error: Some(error.to_string()), stop_reason: "error".into(), ..record(item, started) }
}

/// An item's record before it is answered.
fn record(item: &Item, started: Instant) -> Record {
    Record {
        id: item.id.clone(),
        answer_type: item.answer_type,
        category: item.category.clone(),
        prediction: String::new(),
        parsed: None,
        references: item.references().map(str::to_string).collect(),
        score: 0.0,
        prompt_tokens: 0,
        generated_tokens: 0,
        stop_reason: String::new(),
        latency_s: started.elapsed().as_secs_f64(),
        error: None,
    }
}

/// Merges every shard's results in `output` into `predictions.jsonl` and `summary.json`.
fn merge(benchmark: &Benchmark, output: &Path) -> anyhow::Result<ExitCode> {
    let files = vlm::eval::shard_results_files(output)?;
    anyhow::ensure!(!files.is_empty(), "no predictions.I-of-N.jsonl files in {}", output.display());
    let (records, summary) = vlm::eval::merge(benchmark, &files)?;
    vlm::eval::write_records(&output.join("predictions.jsonl"), &records)?;
    write_json(&output.join("summary.json"), &summary, None)?;
    report(&summary);
    if summary.complete {
        return Ok(ExitCode::SUCCESS);
    }
    let list = |ids: &[String]| {
        let shown: Vec<&str> = ids.iter().take(10).map(String::as_str).collect();
        format!("{}{}", shown.join(", "), if ids.len() > 10 { ", ..." } else { "" })
    };
    for (what, ids) in [("missing", &summary.missing), ("answered twice", &summary.duplicated)] {
        if !ids.is_empty() {
            eprintln!("{} items {what}: {}", ids.len(), list(ids));
        }
    }
    if !summary.unknown.is_empty() {
        eprintln!("{} records of ids not in the benchmark: {}", summary.unknown.len(), list(&summary.unknown));
    }
    Ok(ExitCode::FAILURE)
}

fn report(summary: &Summary) {
    println!(
        "{}: {:.2}% over {}/{} items ({} failed)",
        summary.benchmark.display(),
        100.0 * summary.score,
        summary.answered,
        summary.expected,
        summary.failed
    );
    for (answer_type, group) in &summary.by_answer_type {
        println!("  {answer_type:<16} {:>7.2}%  ({} items)", 100.0 * group.score, group.items);
    }
}

/// Writes a summary as pretty JSON, through a temporary file and a rename.
fn write_json(path: &Path, summary: &Summary, model: Option<&str>) -> anyhow::Result<()> {
    let mut json = serde_json::to_value(summary)?;
    if let (Some(model), Value::Object(map)) = (model, &mut json) {
        map.insert("model".into(), model.into());
    }
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
