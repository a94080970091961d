//! Results files: one JSON line per answered item, appended as each item finishes, so a run that
//! is killed loses at most the items in flight and a restart skips what is already there.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::benchmark::AnswerType;
use super::shard::Shard;
use crate::{Error, Result};

/// One answered item, as a line of a results file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The item's id.
    pub id: String,
    /// The item's answer type (its metric).
    pub answer_type: AnswerType,
    /// The item's category, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The model's answer.
    pub prediction: String,
    /// What the metric read out of the answer (option letter, yes/no).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parsed: Option<String>,
    /// The reference answers.
    pub references: Vec<String>,
    /// The item's score in `[0, 1]` (0 when it failed).
    pub score: f64,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Why generation stopped (`eos`, `length`, ...).
    pub stop_reason: String,
    /// Seconds from the start of the item's batch to its answer.
    pub latency_s: f64,
    /// Why the item could not be answered (an unreadable image, a prompt over the context, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The results file of a shard in an output folder: `predictions.0-of-4.jsonl`.
pub fn shard_results_path(dir: &Path, shard: Shard) -> PathBuf {
    dir.join(format!("predictions.{}.jsonl", shard.tag()))
}

/// The shard results files in an output folder, sorted by name.
pub fn shard_results_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
        let tag = name.strip_prefix("predictions.").and_then(|rest| rest.strip_suffix(".jsonl"));
        if tag.is_some_and(|tag| tag.split_once("-of-").is_some()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads the records of a results file. A last line without its newline (the write a crash cut
/// short) is ignored; any other malformed line is an error naming it.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(parse_records(path, &text)?.0)
}

/// Parses complete lines; returns the records and the byte length of the complete part.
fn parse_records(path: &Path, text: &str) -> Result<(Vec<Record>, usize)> {
    let complete = text.rfind('\n').map_or(0, |end| end + 1);
    let mut records = Vec::new();
    for (index, line) in text[..complete].lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|e| Error::Benchmark {
            path: path.into(),
            line: Some(index + 1),
            message: format!("not a results record: {e}"),
        })?;
        records.push(record);
    }
    Ok((records, complete))
}

/// A results file open for appending. It is locked while open, so two processes given the same
/// shard by mistake cannot interleave their lines.
#[derive(Debug)]
pub struct ResultsWriter {
    path: PathBuf,
    file: File,
}

impl ResultsWriter {
    /// Opens `path` for appending (creating it and its folder) and returns the records already
    /// there. A last line cut off by a crash is removed. With `retry_failed`, records of items
    /// that failed are removed too (the file is rewritten atomically), so they run again.
    pub fn open(path: &Path, retry_failed: bool) -> Result<(Self, Vec<Record>)> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let io = |e| Error::io(path, e);
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        file.try_lock().map_err(|_| Error::Benchmark {
            path: path.into(),
            line: None,
            message: "is in use by another process (is the same shard running twice?)".into(),
        })?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io)?;
        let (mut records, complete) = parse_records(path, &text)?;
        if complete < text.len() {
            log::warn!("{}: dropping an incomplete last line left by an interrupted run", path.display());
            file.set_len(complete as u64).map_err(io)?;
        }
        if retry_failed && records.iter().any(|record| record.error.is_some()) {
            records.retain(|record| record.error.is_none());
            file = rewrite(path, &records)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok((Self { path: path.into(), file }, records))
    }

    /// Appends one record as one line, written in a single call and synced to disk before returning.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let io = |e| Error::io(&self.path, e);
        let mut line = serde_json::to_string(record).map_err(|e| Error::Input(e.to_string()))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Replaces `path` with `records` through a temporary file and a rename, and returns the new file,
/// locked.
fn rewrite(path: &Path, records: &[Record]) -> Result<File> {
    let temporary = path.with_extension("jsonl.tmp");
    write_records(&temporary, records)?;
    let file = OpenOptions::new().read(true).write(true).open(&temporary).map_err(|e| Error::io(&temporary, e))?;
    file.try_lock().map_err(|e| Error::io(&temporary, e.into()))?;
    std::fs::rename(&temporary, path).map_err(|e| Error::io(path, e))?;
    Ok(file)
}

/// Writes records to a new file, one per line, synced to disk.
pub fn write_records(path: &Path, records: &[Record]) -> Result<()> {
    let io = |e| Error::io(path, e);
    let mut text = String::new();
    for record in records {
        text.push_str(&serde_json::to_string(record).map_err(|e| Error::Input(e.to_string()))?);
        text.push('\n');
    }
    let mut file = File::create(path).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, error: Option<&str>) -> Record {
        Record {
            id: id.into(),
            answer_type: AnswerType::Vqa,
            category: None,
            prediction: "two".into(),
            parsed: None,
            references: vec!["2".into()],
            score: 1.0,
            prompt_tokens: 10,
            generated_tokens: 2,
            stop_reason: "eos".into(),
            latency_s: 0.5,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn reopening_returns_what_was_appended_and_drops_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/predictions.0-of-1.jsonl");
        {
            let (mut writer, existing) = ResultsWriter::open(&path, false).unwrap();
            assert!(existing.is_empty());
            writer.append(&record("a", None)).unwrap();
            writer.append(&record("b", None)).unwrap();
        }
        // A crash in the middle of the third write.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"id": "c", "answer_ty"#).unwrap();
        drop(file);

        let (mut writer, existing) = ResultsWriter::open(&path, false).unwrap();
        assert_eq!(existing, [record("a", None), record("b", None)]);
        writer.append(&record("c", None)).unwrap();
        drop(writer);
        assert_eq!(read_records(&path).unwrap(), [record("a", None), record("b", None), record("c", None)]);
    }

    #[test]
    fn retrying_failures_removes_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.0-of-1.jsonl");
        write_records(&path, &[record("a", None), record("b", Some("bad image"))]).unwrap();
        let (_, kept) = ResultsWriter::open(&path, false).unwrap();
        assert_eq!(kept.len(), 2);
        let (_, kept) = ResultsWriter::open(&path, true).unwrap();
        assert_eq!(kept, [record("a", None)]);
        assert_eq!(read_records(&path).unwrap(), [record("a", None)]);
    }

    #[test]
    fn a_file_in_use_cannot_be_opened_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.0-of-1.jsonl");
        let (_writer, _) = ResultsWriter::open(&path, false).unwrap();
        let error = ResultsWriter::open(&path, false).unwrap_err().to_string();
        assert!(error.contains("in use by another process"), "{error}");
    }

    #[test]
    fn a_malformed_middle_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.0-of-1.jsonl");
        std::fs::write(&path, "{}\n").unwrap();
        let error = read_records(&path).unwrap_err().to_string();
        assert!(error.contains("line 1") && error.contains("not a results record"), "{error}");
    }

    #[test]
    fn shard_files_are_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["predictions.1-of-2.jsonl", "predictions.0-of-2.jsonl", "predictions.jsonl", "summary.json"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let files = shard_results_files(dir.path()).unwrap();
        let names: Vec<_> = files.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["predictions.0-of-2.jsonl", "predictions.1-of-2.jsonl"]);
    }
}
