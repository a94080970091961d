//! The standard metrics of VLM benchmarks, each as its benchmark's official evaluation defines it.
//! Every metric gives a score in `[0, 1]` for one prediction against the item's reference answers.

use super::benchmark::{AnswerType, Item, choice_letter};
use super::normalize::normalize_vqa_answer;

/// A prediction's score, and what was read out of it where the metric parses the answer
/// (the option letter, `yes`/`no`).
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// In `[0, 1]`.
    pub score: f64,
    /// The parsed answer, for multiple-choice and yes/no items.
    pub parsed: Option<String>,
}

/// Scores a prediction for an item with the item's metric.
pub fn score(item: &Item, prediction: &str) -> Scored {
    let references: Vec<&str> = item.references().collect();
    let plain = |score: f64| Scored { score, parsed: None };
    match item.answer_type {
        AnswerType::Vqa => plain(vqa_accuracy(prediction, &references)),
        AnswerType::Anls => plain(anls(prediction, &references)),
        AnswerType::Relaxed => plain(max_over(&references, |reference| relaxed_correct(prediction, reference))),
        AnswerType::Substring => plain(max_over(&references, |reference| contains_answer(prediction, reference))),
        AnswerType::YesNo => {
            let parsed = parse_yes_no(prediction);
            let correct = references.iter().any(|reference| parse_yes_no(reference) == parsed && parsed != "other");
            Scored { score: f64::from(u8::from(correct)), parsed: Some(parsed.to_string()) }
        }
        AnswerType::MultipleChoice => {
            let parsed = parse_choice(prediction, &item.choices);
            let correct = parsed.as_ref().is_some_and(|letter| {
                references.iter().any(|reference| reference_letter(reference, &item.choices).as_ref() == Some(letter))
            });
            Scored { score: f64::from(u8::from(correct)), parsed }
        }
    }
}

fn max_over(references: &[&str], correct: impl Fn(&str) -> bool) -> f64 {
    f64::from(u8::from(references.iter().any(|reference| correct(reference))))
}

/// VQA accuracy (Antol et al. 2015, `vqaEval.py`): an answer is fully right when at least 3 of the
/// annotators gave it, `min(#matches / 3, 1)`, averaged over the ten leave-one-annotator-out subsets
/// so that it is comparable to a human's score. Answers are compared after
/// [`normalize_vqa_answer`].
///
/// With a single reference (datasets that keep one answer) the leave-one-out average would be 0
/// for every prediction, so the score is then exact match after normalisation.
pub fn vqa_accuracy(prediction: &str, references: &[&str]) -> f64 {
    let prediction = normalize_vqa_answer(prediction);
    let references: Vec<String> = references.iter().map(|reference| normalize_vqa_answer(reference)).collect();
    match references.len() {
        0 => 0.0,
        1 => f64::from(u8::from(references[0] == prediction)),
        n => {
            let total: f64 = (0..n)
                .map(|left_out| {
                    let matches = (0..n).filter(|&i| i != left_out && references[i] == prediction).count();
                    (matches as f64 / 3.0).min(1.0)
                })
                .sum();
            total / n as f64
        }
    }
}

/// Average Normalised Levenshtein Similarity (Biten et al. 2019, DocVQA): with answers lower-cased
/// and their whitespace collapsed, `NL = levenshtein / max(len)`; the score is the best `1 - NL`
/// over the references, or 0 where `NL >= 0.5`.
pub fn anls(prediction: &str, references: &[&str]) -> f64 {
    const THRESHOLD: f64 = 0.5;
    let normalize = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    let prediction: Vec<char> = normalize(prediction).chars().collect();
    references
        .iter()
        .map(|reference| {
            let reference: Vec<char> = normalize(reference).chars().collect();
            let longest = prediction.len().max(reference.len());
            if longest == 0 {
                return 1.0;
            }
            let distance = levenshtein(&prediction, &reference) as f64 / longest as f64;
            if distance < THRESHOLD { 1.0 - distance } else { 0.0 }
        })
        .fold(0.0, f64::max)
}

/// Edit distance between two character sequences (insertions, deletions, substitutions).
pub fn levenshtein(a: &[char], b: &[char]) -> usize {
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// ChartQA's relaxed accuracy (Methani et al. 2020, as pix2struct implements it): when both are
/// numbers (a trailing `%` divides by 100) and the reference is not zero, right within 5 % of the
/// reference; otherwise a case-insensitive exact match.
pub fn relaxed_correct(prediction: &str, reference: &str) -> bool {
    const MAX_RELATIVE_CHANGE: f64 = 0.05;
    let number = |text: &str| {
        let text = text.trim();
        match text.strip_suffix('%') {
            Some(percent) => percent.trim_end().parse::<f64>().ok().map(|value| value / 100.0),
            None => text.parse::<f64>().ok(),
        }
    };
    match (number(prediction), number(reference)) {
        (Some(predicted), Some(target)) if target != 0.0 => {
            (predicted - target).abs() / target.abs() <= MAX_RELATIVE_CHANGE
        }
        _ => prediction.trim().to_lowercase() == reference.trim().to_lowercase(),
    }
}

/// OCRBench: right when the reference, lower-cased and trimmed, appears in the prediction
/// (newlines read as spaces).
pub fn contains_answer(prediction: &str, reference: &str) -> bool {
    let normalize = |text: &str| text.to_lowercase().trim().replace('\n', " ");
    let reference = normalize(reference);
    !reference.is_empty() && normalize(prediction).contains(&reference)
}

/// MME's answer parsing: `yes` or `no` when the answer is exactly that (periods ignored), else
/// whichever of them appears in its first four characters, else `other` (always wrong).
pub fn parse_yes_no(answer: &str) -> &'static str {
    let answer = answer.to_lowercase().trim().replace('.', "");
    match answer.as_str() {
        "yes" => "yes",
        "no" => "no",
        _ => {
            let prefix: String = answer.chars().take(4).collect();
            if prefix.contains("yes") {
                "yes"
            } else if prefix.contains("no") {
                "no"
            } else {
                "other"
            }
        }
    }
}

/// MMMU's option extraction (`parse_multi_choice_response`), without its random guess: the letter
/// in `(B)`, else a letter followed by a space (`B is right`), else `B.`, else — for answers longer
/// than five words — the option whose text the answer contains. Where several letters match, the
/// one mentioned last wins. `None` when nothing matches.
pub fn parse_choice(answer: &str, choices: &[String]) -> Option<String> {
    let letters: Vec<String> = (0..choices.len()).map(choice_letter).collect();
    let trimmed = answer.trim().trim_matches([',', '.', '!', '?', ';', ':', '\'']);
    let response = format!(" {trimmed} ");

    let found = |pattern: &dyn Fn(&str) -> String| -> Vec<usize> {
        (0..letters.len()).filter(|&i| response.contains(&pattern(&letters[i]))).collect()
    };
    let last_of = |candidates: Vec<usize>, pattern: &dyn Fn(&str) -> String| -> Option<String> {
        let position = |i: &usize| response.rfind(&pattern(&letters[*i])).map_or(-1, |p| p as i64);
        let best = candidates.iter().rev().max_by_key(|i| position(i))?;
        Some(letters[*best].clone())
    };

    let bracketed = |letter: &str| format!("({letter})");
    let candidates = found(&bracketed);
    if !candidates.is_empty() {
        return last_of(candidates, &bracketed);
    }
    let spaced = |letter: &str| format!(" {letter} ");
    let candidates = found(&|letter: &str| format!("{letter} "));
    if !candidates.is_empty() {
        return last_of(candidates, &spaced);
    }
    let candidates = found(&|letter: &str| format!("{letter}."));
    if !candidates.is_empty() {
        return last_of(candidates, &spaced);
    }
    if response.split_whitespace().count() > 5 {
        let lower = response.to_lowercase();
        let by_text: Vec<usize> = (0..choices.len()).filter(|&i| lower.contains(&choices[i].to_lowercase())).collect();
        let best = by_text.iter().rev().max_by_key(|&&i| lower.rfind(&choices[i].to_lowercase()))?;
        return Some(letters[*best].clone());
    }
    None
}

/// The letter a multiple-choice reference stands for: the letter itself (`B`, `(B)`, `b`), or the
/// text of one of the choices.
fn reference_letter(reference: &str, choices: &[String]) -> Option<String> {
    let reference = reference.trim();
    let letter = reference.trim_start_matches('(').trim_end_matches([')', '.']).to_uppercase();
    if letter.len() == 1 && (0..choices.len()).any(|i| choice_letter(i) == letter) {
        return Some(letter);
    }
    choices.iter().position(|choice| choice.trim().eq_ignore_ascii_case(reference)).map(choice_letter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(answer_type: AnswerType, answers: &[&str], choices: &[&str]) -> Item {
        Item {
            id: "x".into(),
            image: None,
            images: Vec::new(),
            question: "Q".into(),
            answer: None,
            answers: answers.iter().map(|a| a.to_string()).collect(),
            answer_type,
            choices: choices.iter().map(|c| c.to_string()).collect(),
            category: None,
            prompt: None,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn vqa_accuracy_averages_min_matches_over_three_across_leave_one_out_subsets() {
        let ten = |matching: usize| -> Vec<&str> { (0..10).map(|i| if i < matching { "2" } else { "3" }).collect() };
        // 0 matches: 0. 1 match: the 9 subsets keeping that annotator give 1/3 -> 0.3.
        assert!(close(vqa_accuracy("2", &ten(0)), 0.0));
        assert!(close(vqa_accuracy("2", &ten(1)), 0.3));
        // 2 matches: 8 subsets with both (2/3), 2 with one (1/3): (8*2/3 + 2/3)/10 = 0.6.
        assert!(close(vqa_accuracy("2", &ten(2)), 0.6));
        // 3 matches: 7 subsets with 3 (1), 3 with 2 (2/3): 0.9. 4 or more: always >= 3 -> 1.
        assert!(close(vqa_accuracy("2", &ten(3)), 0.9));
        assert!(close(vqa_accuracy("2", &ten(4)), 1.0));
        // Normalisation applies to both sides: "Two." == "2".
        assert!(close(vqa_accuracy("Two.", &ten(10)), 1.0));
        assert!(close(vqa_accuracy("the dog", &["Dog"]), 1.0));
        assert!(close(vqa_accuracy("cat", &["dog"]), 0.0));
    }

    #[test]
    fn anls_scores_similarity_above_the_threshold() {
        assert!(close(anls("Hello World", &["hello  world"]), 1.0));
        // One substitution in 5 characters: NL = 0.2 -> 0.8.
        assert!(close(anls("hellp", &["hello"]), 0.8));
        // The best reference counts.
        assert!(close(anls("hellp", &["xyz", "hello"]), 0.8));
        // NL = 3/5 >= 0.5 -> 0; exactly 0.5 -> 0 as well.
        assert!(close(anls("hexyz", &["hello"]), 0.0));
        assert!(close(anls("ab", &["ax"]), 0.0));
        assert_eq!(levenshtein(&['k', 'i', 't', 't', 'e', 'n'], &['s', 'i', 't', 't', 'i', 'n', 'g']), 3);
    }

    #[test]
    fn relaxed_accuracy_allows_five_percent_on_numbers() {
        assert!(relaxed_correct("104", "100"));
        assert!(relaxed_correct("95", "100"));
        assert!(!relaxed_correct("105.1", "100"));
        assert!(relaxed_correct("12%", "0.12"));
        assert!(relaxed_correct("Yes", "yes"));
        assert!(!relaxed_correct("Blue", "Red"));
        // A zero reference needs the exact text.
        assert!(relaxed_correct("0", "0") && !relaxed_correct("0.0", "0"));
        let item = item(AnswerType::Relaxed, &["7", "seven"], &[]);
        assert_eq!(score(&item, "Seven").score, 1.0);
    }

    #[test]
    fn yes_no_reads_the_start_of_the_answer_like_mme() {
        assert_eq!(parse_yes_no("Yes."), "yes");
        assert_eq!(parse_yes_no("No, there is no dog."), "no");
        assert_eq!(parse_yes_no("Yes, there is."), "yes");
        assert_eq!(parse_yes_no("There is a dog."), "other");
        let yes = item(AnswerType::YesNo, &["Yes"], &[]);
        assert_eq!(score(&yes, "yes, it is").score, 1.0);
        assert_eq!(score(&yes, "No").score, 0.0);
        assert_eq!(score(&yes, "Maybe").parsed.as_deref(), Some("other"));
    }

    #[test]
    fn substring_match_is_case_insensitive() {
        assert!(contains_answer("The sign says STOP here", "stop"));
        assert!(contains_answer("line one\nline two", "one line"));
        assert!(!contains_answer("nothing", "stop"));
        assert!(!contains_answer("anything", " "));
    }

    #[test]
    fn choice_letter_extraction_follows_mmmu() {
        let choices: Vec<String> = ["a cat", "a dog", "a bird", "a fish"].iter().map(|c| c.to_string()).collect();
        let parse = |answer: &str| parse_choice(answer, &choices);
        assert_eq!(parse("B").as_deref(), Some("B"));
        assert_eq!(parse("(C) a bird").as_deref(), Some("C"));
        assert_eq!(parse("D.").as_deref(), Some("D"));
        assert_eq!(parse("The answer is B.").as_deref(), Some("B"));
        // Several letters: the last mentioned wins.
        assert_eq!(parse("Not (A), the answer is (C)").as_deref(), Some("C"));
        // No letter, but a long answer naming an option's text.
        assert_eq!(parse("I think the picture shows a dog sitting").as_deref(), Some("B"));
        // Too short to match by text, and no letter: nothing (MMMU would guess at random).
        assert_eq!(parse("dog"), None);
        assert_eq!(parse("E"), None);
    }

    #[test]
    fn multiple_choice_reference_may_be_a_letter_or_the_option_text() {
        let by_letter = item(AnswerType::MultipleChoice, &["B"], &["red", "blue"]);
        let by_text = item(AnswerType::MultipleChoice, &["blue"], &["red", "blue"]);
        for item in [by_letter, by_text] {
            let scored = score(&item, "B");
            assert_eq!((scored.score, scored.parsed.as_deref()), (1.0, Some("B")));
            assert_eq!(score(&item, "A").score, 0.0);
        }
    }
}
