//! Benchmarks as JSONL: one item per line, with its image(s), question, reference answers and
//! answer type; and the prompt each item is asked with.
//!
//! ```json
//! {"id": "q1", "image": "images/chart.png", "question": "What is the peak?", "answers": ["42"], "answer_type": "relaxed"}
//! {"id": "q2", "images": ["a.jpg", "b.jpg"], "question": "Which is larger?", "choices": ["left", "right"], "answer": "B", "answer_type": "multiple_choice", "category": "spatial"}
//! ```
//! Image paths are relative to the benchmark file's folder. `answer` is a shorthand for a one-element
//! `answers`. `prompt`, when given, replaces the question and the answer type's suffix verbatim.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How an item's prediction is scored (and which prompt suffix it gets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerType {
    /// VQA accuracy over human answers (VQAv2, TextVQA, OK-VQA, VizWiz).
    Vqa,
    /// Average normalised Levenshtein similarity (DocVQA, InfographicVQA).
    Anls,
    /// Numbers within 5 % of the reference, other answers exact (ChartQA).
    Relaxed,
    /// An option letter extracted from the answer (MMMU, AI2D, MMBench, ScienceQA).
    MultipleChoice,
    /// Yes or no (POPE, MME).
    YesNo,
    /// The reference appears in the answer (OCRBench).
    Substring,
}

impl AnswerType {
    /// The names used in benchmark files.
    pub const ALL: [AnswerType; 6] = [
        AnswerType::Vqa,
        AnswerType::Anls,
        AnswerType::Relaxed,
        AnswerType::MultipleChoice,
        AnswerType::YesNo,
        AnswerType::Substring,
    ];

    /// The instruction appended to the question, as lmms-eval, VLMEvalKit and the InternVL
    /// evaluation scripts phrase it for this kind of benchmark.
    pub fn prompt_suffix(self) -> &'static str {
        match self {
            AnswerType::Vqa | AnswerType::Anls | AnswerType::Relaxed | AnswerType::YesNo => {
                "\nAnswer the question using a single word or phrase."
            }
            AnswerType::MultipleChoice => "\nAnswer with the option's letter from the given choices directly.",
            AnswerType::Substring => "",
        }
    }

    /// The name used in benchmark files (`vqa`, `multiple_choice`, ...).
    pub fn name(self) -> &'static str {
        match self {
            AnswerType::Vqa => "vqa",
            AnswerType::Anls => "anls",
            AnswerType::Relaxed => "relaxed",
            AnswerType::MultipleChoice => "multiple_choice",
            AnswerType::YesNo => "yes_no",
            AnswerType::Substring => "substring",
        }
    }
}

impl fmt::Display for AnswerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One benchmark item, as read from its JSONL line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// Unique within the benchmark.
    pub id: String,
    /// One image (shorthand for a one-element `images`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// Images, in the order they are shown to the model (before the question).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<PathBuf>,
    /// The question.
    pub question: String,
    /// One reference answer (shorthand for a one-element `answers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Reference answers (VQA: the human answers, usually ten).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<String>,
    /// How the prediction is scored.
    pub answer_type: AnswerType,
    /// Options of a multiple-choice item, lettered A, B, C, ... in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// A category for per-category scores in the summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The full prompt, used verbatim instead of the question, choices and suffix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

impl Item {
    /// The image paths, in order.
    pub fn image_paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.image.iter().chain(&self.images)
    }

    /// The reference answers.
    pub fn references(&self) -> impl Iterator<Item = &str> {
        self.answer.iter().chain(&self.answers).map(String::as_str)
    }

    /// The letters of the choices: `A`, `B`, ...
    pub fn choice_letters(&self) -> Vec<String> {
        (0..self.choices.len()).map(choice_letter).collect()
    }

    /// The text the model is asked: the question, the lettered choices, and the answer type's
    /// instruction (or the item's own `prompt`).
    pub fn prompt_text(&self) -> String {
        if let Some(prompt) = &self.prompt {
            return prompt.clone();
        }
        let mut text = self.question.clone();
        for (index, choice) in self.choices.iter().enumerate() {
            text.push_str(&format!("\n{}. {choice}", choice_letter(index)));
        }
        text.push_str(self.answer_type.prompt_suffix());
        text
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.id.is_empty() {
            return Err("empty id".into());
        }
        if self.references().next().is_none() {
            return Err(format!("item {}: no reference answer (`answer` or `answers`)", self.id));
        }
        if self.choices.len() > 26 {
            return Err(format!("item {}: more than 26 choices", self.id));
        }
        if self.answer_type == AnswerType::MultipleChoice && self.choices.len() < 2 {
            return Err(format!("item {}: a multiple-choice item needs at least two `choices`", self.id));
        }
        Ok(())
    }
}

/// The letter of the choice at `index` (0 -> `A`).
pub fn choice_letter(index: usize) -> String {
    char::from(b'A' + (index % 26) as u8).to_string()
}

/// A benchmark read from a JSONL file, its items in file order.
#[derive(Debug, Clone)]
pub struct Benchmark {
    /// The file it was read from.
    pub path: PathBuf,
    /// The items, in file order.
    pub items: Vec<Item>,
}

impl Benchmark {
    /// Reads and checks a JSONL benchmark: every line an item (blank lines skipped), ids unique,
    /// every item with a reference answer. Image paths are made relative to the file's folder.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let folder = path.parent().unwrap_or(Path::new("."));
        let error = |line: usize, message: String| Error::Benchmark { path: path.into(), line: Some(line), message };
        let mut items = Vec::new();
        let mut ids = HashSet::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut item: Item = serde_json::from_str(line).map_err(|e| error(index + 1, e.to_string()))?;
            item.validate().map_err(|message| error(index + 1, message))?;
            if !ids.insert(item.id.clone()) {
                return Err(error(index + 1, format!("duplicate id {}", item.id)));
            }
            item.image = item.image.map(|image| folder.join(image));
            item.images = item.images.iter().map(|image| folder.join(image)).collect();
            items.push(item);
        }
        if items.is_empty() {
            return Err(Error::Benchmark { path: path.into(), line: None, message: "no items".into() });
        }
        Ok(Self { path: path.into(), items })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(line: &str) -> Item {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn multiple_choice_prompt_letters_the_choices() {
        let item = item(
            r#"{"id": "1", "question": "Which?", "choices": ["red", "blue"], "answer": "B", "answer_type": "multiple_choice"}"#,
        );
        assert_eq!(
            item.prompt_text(),
            "Which?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
        );
    }

    #[test]
    fn own_prompt_is_used_verbatim() {
        let item =
            item(r#"{"id": "1", "question": "Q", "prompt": "Read it.", "answer": "x", "answer_type": "substring"}"#);
        assert_eq!(item.prompt_text(), "Read it.");
    }

    #[test]
    fn reading_rejects_duplicates_and_items_without_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.jsonl");
        let good = r#"{"id": "a", "image": "x.png", "question": "Q", "answer": "1", "answer_type": "vqa"}"#;
        std::fs::write(&path, format!("{good}\n\n{good}\n")).unwrap();
        let message = Benchmark::read(&path).unwrap_err().to_string();
        assert!(message.contains("line 3") && message.contains("duplicate id a"), "{message}");

        std::fs::write(&path, r#"{"id": "a", "question": "Q", "answer_type": "vqa"}"#).unwrap();
        let message = Benchmark::read(&path).unwrap_err().to_string();
        assert!(message.contains("line 1") && message.contains("no reference answer"), "{message}");

        std::fs::write(&path, r#"{"id": "a", "question": "Q", "answer": "1", "answer_type": "essay"}"#).unwrap();
        assert!(Benchmark::read(&path).unwrap_err().to_string().contains("unknown variant `essay`"));

        std::fs::write(&path, format!("{good}\n")).unwrap();
        let benchmark = Benchmark::read(&path).unwrap();
        assert_eq!(benchmark.items[0].image_paths().collect::<Vec<_>>(), [&dir.path().join("x.png")]);
    }
}
