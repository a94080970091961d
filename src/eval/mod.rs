//! Accuracy benchmarking: benchmarks as JSONL, the standard metrics, sharding over processes
//! (Slurm job arrays), resumable results files and their merge into one summary.
//!
//! The `eval` example is the command-line runner built on this module.
//!
//! | answer type | metric | benchmarks |
//! |---|---|---|
//! | `vqa` | VQA accuracy, `min(#matches / 3, 1)` over leave-one-out subsets | VQAv2, TextVQA, OK-VQA |
//! | `anls` | Average Normalised Levenshtein Similarity (threshold 0.5) | DocVQA, InfoVQA |
//! | `relaxed` | numbers within 5 %, other answers exact | ChartQA |
//! | `multiple_choice` | option letter extracted as MMMU does | MMMU, AI2D, MMBench, ScienceQA |
//! | `yes_no` | yes/no read as MME does | POPE, MME |
//! | `substring` | reference contained in the answer | OCRBench |

mod benchmark;
pub mod metrics;
mod normalize;
mod results;
mod shard;
mod summary;

pub use benchmark::{AnswerType, Benchmark, Item, choice_letter};
pub use metrics::{Scored, score};
pub use normalize::normalize_vqa_answer;
pub use results::{Record, ResultsWriter, read_records, shard_results_files, shard_results_path, write_records};
pub use shard::Shard;
pub use summary::{Group, Summary, merge};
