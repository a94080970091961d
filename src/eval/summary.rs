//! Scores of a run (or of several shards merged): overall, per answer type and per category, with
//! the items that are missing or were answered more than once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::benchmark::Benchmark;
use super::results::{Record, read_records};
use crate::Result;

/// Mean score of a group of items.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Items answered in the group.
    pub items: usize,
    /// Mean score in `[0, 1]`.
    pub score: f64,
}

/// What a run scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The benchmark file.
    pub benchmark: PathBuf,
    /// Items expected (the benchmark's, or a shard's).
    pub expected: usize,
    /// Items answered (failed ones included).
    pub answered: usize,
    /// Items that could not be answered (scored 0).
    pub failed: usize,
    /// Mean score over the answered items, in `[0, 1]`.
    pub score: f64,
    /// Mean score per answer type.
    pub by_answer_type: BTreeMap<String, Group>,
    /// Mean score per category (items without one are left out).
    pub by_category: BTreeMap<String, Group>,
    /// Prompt tokens over all items.
    pub prompt_tokens: usize,
    /// Generated tokens over all items.
    pub generated_tokens: usize,
    /// Mean seconds from an item's batch start to its answer.
    pub mean_latency_s: f64,
    /// Expected items with no record.
    pub missing: Vec<String>,
    /// Items with more than one record (the first is counted).
    pub duplicated: Vec<String>,
    /// Records of ids the benchmark does not have (not counted).
    pub unknown: Vec<String>,
    /// Every expected item answered exactly once, and nothing else.
    pub complete: bool,
    /// The results files summarised.
    pub files: Vec<PathBuf>,
}

impl Summary {
    /// Summarises `records` against the ids expected, in benchmark order. Returns the records kept
    /// (one per expected id, in the expected order) with the summary.
    pub fn compute(
        benchmark: &Path,
        expected: &[&str],
        records: Vec<Record>,
        files: Vec<PathBuf>,
    ) -> (Vec<Record>, Summary) {
        let expected_set: HashSet<&str> = expected.iter().copied().collect();
        let mut by_id: HashMap<String, Record> = HashMap::new();
        let mut duplicated = Vec::new();
        let mut unknown = Vec::new();
        for record in records {
            if !expected_set.contains(record.id.as_str()) {
                unknown.push(record.id);
            } else if by_id.contains_key(&record.id) {
                duplicated.push(record.id);
            } else {
                by_id.insert(record.id.clone(), record);
            }
        }
        duplicated.sort();
        duplicated.dedup();
        let missing: Vec<String> =
            expected.iter().filter(|id| !by_id.contains_key(**id)).map(|id| id.to_string()).collect();
        let kept: Vec<Record> = expected.iter().filter_map(|id| by_id.remove(*id)).collect();

        let mut by_answer_type: BTreeMap<String, Group> = BTreeMap::new();
        let mut by_category: BTreeMap<String, Group> = BTreeMap::new();
        for record in &kept {
            add(by_answer_type.entry(record.answer_type.to_string()).or_default(), record.score);
            if let Some(category) = &record.category {
                add(by_category.entry(category.clone()).or_default(), record.score);
            }
        }
        let answered = kept.len();
        let mean = |total: f64| if answered == 0 { 0.0 } else { total / answered as f64 };
        let summary = Summary {
            benchmark: benchmark.into(),
            expected: expected.len(),
            answered,
            failed: kept.iter().filter(|record| record.error.is_some()).count(),
            score: mean(kept.iter().map(|record| record.score).sum()),
            by_answer_type,
            by_category,
            prompt_tokens: kept.iter().map(|record| record.prompt_tokens).sum(),
            generated_tokens: kept.iter().map(|record| record.generated_tokens).sum(),
            mean_latency_s: mean(kept.iter().map(|record| record.latency_s).sum()),
            complete: missing.is_empty() && duplicated.is_empty() && unknown.is_empty(),
            missing,
            duplicated,
            unknown,
            files,
        };
        (kept, summary)
    }
}

/// Running mean: adds one score to a group.
fn add(group: &mut Group, score: f64) {
    group.items += 1;
    group.score += (score - group.score) / group.items as f64;
}

/// Reads every results file and summarises them against the whole benchmark: the merge of a
/// sharded run. Returns the records in benchmark order with the summary.
pub fn merge(benchmark: &Benchmark, files: &[PathBuf]) -> Result<(Vec<Record>, Summary)> {
    let mut records = Vec::new();
    for file in files {
        records.extend(read_records(file)?);
    }
    let expected: Vec<&str> = benchmark.items.iter().map(|item| item.id.as_str()).collect();
    Ok(Summary::compute(&benchmark.path, &expected, records, files.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::AnswerType;

    fn record(id: &str, score: f64, answer_type: AnswerType, category: Option<&str>) -> Record {
        Record {
            id: id.into(),
            answer_type,
            category: category.map(str::to_string),
            prediction: String::new(),
            parsed: None,
            references: Vec::new(),
            score,
            prompt_tokens: 3,
            generated_tokens: 1,
            stop_reason: "eos".into(),
            latency_s: 1.0,
            error: None,
        }
    }

    #[test]
    fn summary_reports_groups_missing_duplicated_and_unknown_items() {
        let records = vec![
            record("a", 1.0, AnswerType::Vqa, Some("x")),
            record("b", 0.0, AnswerType::Vqa, Some("y")),
            record("c", 0.5, AnswerType::Anls, Some("x")),
            record("a", 0.0, AnswerType::Vqa, Some("x")),
            record("z", 1.0, AnswerType::Vqa, None),
        ];
        let (kept, summary) = Summary::compute(Path::new("b.jsonl"), &["c", "a", "b", "d"], records, Vec::new());
        assert_eq!(kept.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["c", "a", "b"]);
        assert_eq!((summary.expected, summary.answered), (4, 3));
        assert!((summary.score - 0.5).abs() < 1e-12);
        assert_eq!(summary.by_answer_type["vqa"], Group { items: 2, score: 0.5 });
        assert_eq!(summary.by_category["x"], Group { items: 2, score: 0.75 });
        assert_eq!(
            (summary.missing, summary.duplicated, summary.unknown),
            (vec!["d".into()], vec!["a".into()], vec!["z".into()])
        );
        assert!(!summary.complete);
        assert_eq!((summary.prompt_tokens, summary.generated_tokens), (9, 3));
    }
}
