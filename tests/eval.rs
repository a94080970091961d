//! The `eval` example on a fixture benchmark and model: scoring, sharding and merging, resuming.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{example, fixture_image, model_dir};
use serde_json::Value;
use vlm::eval::{Benchmark, Record, read_records};

fn benchmark() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/bench.jsonl")
}

fn eval(args: &[&str]) -> Command {
    let mut command = Command::new(example("eval"));
    command.args(args);
    for name in ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"] {
        command.env_remove(name);
    }
    command
}

/// `eval run` on the fixture model, greedy, short answers.
fn run(benchmark: &Path, output: &Path, extra: &[&str]) -> Command {
    let model = model_dir("internvl3-hf");
    let mut command = eval(&["run", "--model", model.to_str().unwrap(), "--device", "cpu", "--quiet"]);
    command.args(["--benchmark", benchmark.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    for (flag, default) in [("--max-new-tokens", "4"), ("--batch-size", "3")] {
        if !extra.contains(&flag) {
            command.args([flag, default]);
        }
    }
    command.args(extra);
    command
}

fn merge(output: &Path) -> Output {
    let benchmark = benchmark();
    eval(&["merge", "--benchmark", benchmark.to_str().unwrap(), "--output", output.to_str().unwrap()]).output().unwrap()
}

fn succeeds(command: &mut Command) -> Output {
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    output
}

fn read_summary(output: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(output.join("summary.json")).unwrap()).unwrap()
}

/// Records without their timings, which differ from run to run.
fn untimed(path: &Path) -> Vec<Record> {
    read_records(path).unwrap().into_iter().map(|record| Record { latency_s: 0.0, ..record }).collect()
}

#[test]
fn a_run_answers_every_item_like_the_library_and_scores_it() {
    let dir = tempfile::tempdir().unwrap();
    succeeds(&mut run(&benchmark(), dir.path(), &[]));
    let records = read_records(&dir.path().join("predictions.jsonl")).unwrap();
    let items = Benchmark::read(benchmark()).unwrap().items;
    let ids = |records: &[Record]| records.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&records), items.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), "benchmark order");

    // The unreadable image fails that item only.
    let broken = records.iter().find(|r| r.id == "broken-image").unwrap();
    assert!(broken.error.as_deref().unwrap().contains("no-such-file.png"), "{broken:?}");
    assert_eq!(broken.score, 0.0);
    let summary = read_summary(dir.path());
    assert_eq!((summary["expected"].as_u64(), summary["answered"].as_u64()), (Some(10), Some(10)));
    assert_eq!((summary["failed"].as_u64(), summary["complete"].as_bool()), (Some(1), Some(true)));

    // Each answer is the library's greedy answer to the item's prompt, and its score is its metric's.
    let vlm = vlm::Vlm::from_dir(&model_dir("internvl3-hf"), &vlm::device::cpu()).unwrap();
    let config = vlm::GenerationConfig::default().temperature(0.0).max_new_tokens(4);
    for (item, record) in items.iter().zip(&records).filter(|(_, record)| record.error.is_none()) {
        let mut message = vlm::Message::user();
        for path in item.image_paths() {
            message = message.image(vlm::Image::open(path).unwrap());
        }
        let expected = vlm.generate(&[message.text(item.prompt_text())], &config).unwrap();
        assert_eq!(record.prediction, expected.text, "{}", item.id);
        assert_eq!(record.score, vlm::eval::score(item, &record.prediction).score, "{}", item.id);
    }

    // With the model's own answers as references, everything that ran scores 1.
    let echo = dir.path().join("echo.jsonl");
    let mut file = std::fs::File::create(&echo).unwrap();
    for record in records.iter().filter(|r| r.error.is_none()) {
        let item = items.iter().find(|i| i.id == record.id).unwrap();
        let images: Vec<&PathBuf> = item.image_paths().collect();
        let mut line = serde_json::to_value(item).unwrap();
        let fields = line.as_object_mut().unwrap();
        fields.remove("image");
        fields.remove("answer");
        fields.insert("images".into(), serde_json::json!(images));
        fields.insert("answers".into(), serde_json::json!([record.prediction]));
        // The same prompt as before, whatever the answer type's suffix.
        fields.insert("prompt".into(), item.prompt_text().into());
        fields.insert("answer_type".into(), "anls".into());
        writeln!(file, "{line}").unwrap();
    }
    drop(file);
    let out = dir.path().join("echo");
    succeeds(&mut run(&echo, &out, &[]));
    assert_eq!(read_summary(&out)["score"].as_f64(), Some(1.0));
}

#[test]
fn shards_from_flags_and_slurm_merge_into_the_whole_run() {
    let whole = tempfile::tempdir().unwrap();
    succeeds(&mut run(&benchmark(), whole.path(), &[]));
    let sharded = tempfile::tempdir().unwrap();
    succeeds(&mut run(&benchmark(), sharded.path(), &["--shard", "0/3"]));
    // A job array `--array=1-3`: task ids 2 and 3 are shards 1/3 and 2/3.
    for task in ["2", "3"] {
        let mut command = run(&benchmark(), sharded.path(), &[]);
        command.env("SLURM_ARRAY_TASK_ID", task).env("SLURM_ARRAY_TASK_COUNT", "3").env("SLURM_ARRAY_TASK_MIN", "1");
        succeeds(&mut command);
    }
    for shard in ["0-of-3", "1-of-3", "2-of-3"] {
        let records = read_records(&sharded.path().join(format!("predictions.{shard}.jsonl"))).unwrap();
        assert!(records.len() >= 3, "{shard}: {} items", records.len());
    }
    let merged = merge(sharded.path());
    assert!(merged.status.success(), "{}", String::from_utf8_lossy(&merged.stderr));
    assert_eq!(untimed(&sharded.path().join("predictions.jsonl")), untimed(&whole.path().join("predictions.jsonl")));
    let (whole, sharded) = (read_summary(whole.path()), read_summary(sharded.path()));
    for key in ["expected", "answered", "failed", "score", "by_answer_type", "by_category", "complete"] {
        assert_eq!(whole[key], sharded[key], "{key}");
    }
}

#[test]
fn merge_reports_missing_and_duplicated_items_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    succeeds(&mut run(&benchmark(), dir.path(), &["--shard", "0/2"]));
    let merged = merge(dir.path());
    assert_eq!(merged.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&merged.stderr);
    assert!(stderr.contains("5 items missing: docvqa-1, mmmu-1"), "{stderr}");
    let summary = read_summary(dir.path());
    assert_eq!(summary["complete"], false);
    assert_eq!(summary["missing"].as_array().unwrap().len(), 5);

    // A second split of the same benchmark into the same folder answers items twice; the whole
    // run merges at its end, so it reports them itself.
    let whole = run(&benchmark(), dir.path(), &["--shard", "0/1"]).output().unwrap();
    assert_eq!(whole.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&whole.stderr).contains("5 items answered twice"));
    assert_eq!(read_summary(dir.path())["duplicated"].as_array().unwrap().len(), 5);
}

#[test]
fn a_killed_run_resumes_to_the_same_output_as_an_uninterrupted_one() {
    let long = ["--max-new-tokens", "40", "--batch-size", "1"];
    let whole = tempfile::tempdir().unwrap();
    succeeds(&mut run(&benchmark(), whole.path(), &long));

    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("predictions.0-of-1.jsonl");
    let mut child = run(&benchmark(), dir.path(), &long).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let answered = || std::fs::read_to_string(&results).map(|text| text.lines().count()).unwrap_or(0);
    while answered() < 2 {
        assert!(Instant::now() < deadline && child.try_wait().unwrap().is_none(), "no answers before the deadline");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let answered_before_kill = answered();
    assert!(answered_before_kill < 10, "the run finished before it could be interrupted");
    // The kill landed in the middle of writing a line.
    let mut file = std::fs::OpenOptions::new().append(true).open(&results).unwrap();
    file.write_all(br#"{"id":"mme-1","answer_type":"yes_"#).unwrap();
    drop(file);

    succeeds(run(&benchmark(), dir.path(), &long).args(["--limit", "2"]));
    assert_eq!(read_records(&results).unwrap().len(), answered_before_kill + 2);
    succeeds(&mut run(&benchmark(), dir.path(), &long));
    assert_eq!(untimed(&dir.path().join("predictions.jsonl")), untimed(&whole.path().join("predictions.jsonl")));
    assert_eq!(read_summary(dir.path())["complete"], true);
}

#[test]
fn failed_items_run_again_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let bench = dir.path().join("bench.jsonl");
    std::fs::write(
        &bench,
        r#"{"id": "later", "image": "later.png", "question": "What is it?", "answer": "x", "answer_type": "vqa"}"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    succeeds(&mut run(&bench, &out, &[]));
    assert_eq!(read_summary(&out)["failed"], 1);
    std::fs::copy(fixture_image("square.png"), dir.path().join("later.png")).unwrap();
    succeeds(&mut run(&bench, &out, &[]));
    assert_eq!(read_summary(&out)["failed"], 1, "a plain resume keeps the failure");
    succeeds(&mut run(&bench, &out, &["--retry-failed"]));
    assert_eq!(read_summary(&out)["failed"], 0);
    assert_eq!(read_records(&out.join("predictions.0-of-1.jsonl")).unwrap().len(), 1);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(&benchmark(), dir.path(), &["--shard", "3/3"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("shard 3/3"));
    let output = run(&dir.path().join("none.jsonl"), dir.path(), &[]).output().unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("none.jsonl"));
}

#[test]
fn a_qwen_vl_checkpoint_runs_the_benchmark_like_the_library() {
    runs_the_benchmark_like_the_library("qwen2_5-vl");
}

#[test]
fn a_llava_checkpoint_runs_the_benchmark_like_the_library() {
    runs_the_benchmark_like_the_library("llava");
}

#[test]
fn a_nemotron_omni_checkpoint_runs_the_benchmark_like_the_library() {
    runs_the_benchmark_like_the_library("nemotron-omni");
}

fn runs_the_benchmark_like_the_library(checkpoint: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(checkpoint);
    let mut command = eval(&["run", "--model", model.to_str().unwrap(), "--device", "cpu", "--quiet"]);
    command.args(["--benchmark", benchmark().to_str().unwrap(), "--output", dir.path().to_str().unwrap()]);
    succeeds(command.args(["--max-new-tokens", "4", "--batch-size", "3"]));
    let records = read_records(&dir.path().join("predictions.jsonl")).unwrap();
    let items = Benchmark::read(benchmark()).unwrap().items;
    let vlm = vlm::Vlm::from_dir(&model, &vlm::device::cpu()).unwrap();
    let config = vlm::GenerationConfig::default().temperature(0.0).max_new_tokens(4);
    let mut answered = 0;
    for (item, record) in items.iter().zip(&records).filter(|(_, record)| record.error.is_none()) {
        let mut message = vlm::Message::user();
        for path in item.image_paths() {
            message = message.image(vlm::Image::open(path).unwrap());
        }
        let expected = vlm.generate(&[message.text(item.prompt_text())], &config).unwrap();
        assert_eq!(record.prediction, expected.text, "{}", item.id);
        answered += 1;
    }
    assert_eq!(answered, items.len() - 1, "every item but the broken image");
}
