//! The VQA answer normalisation of the official VQA evaluation (`vqaEval.py`, as EvalAI and
//! lmms-eval's `EvalAIAnswerProcessor` apply it): lower case, punctuation, number words to digits,
//! articles dropped, contractions restored.

/// Punctuation removed (or turned into a space) by the VQA normalisation. `.` is handled apart.
const PUNCTUATION: [char; 21] =
    [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!'];

/// Number words written as digits.
const NUMBERS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// Contractions written without their apostrophe, and the spelling the annotations use.
/// The official table also has capitalised keys (`Im`, `Ive`, `Id've`); the words are lower-cased
/// before the lookup, so they never match and are left out.
const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// Normalises a VQA answer (prediction or reference) the way the official evaluation does.
///
/// ```
/// use vlm::eval::normalize_vqa_answer;
/// assert_eq!(normalize_vqa_answer("Two dogs."), "2 dogs");
/// assert_eq!(normalize_vqa_answer("The Yankees!"), "yankees");
/// assert_eq!(normalize_vqa_answer("dont know"), "don't know");
/// ```
pub fn normalize_vqa_answer(answer: &str) -> String {
    // Tokenisation: lower case, no commas or question marks, a space before a possessive.
    let text = answer.to_lowercase().replace([',', '?'], "").replace("'s", " 's");
    let text = text.trim().replace(['\n', '\t'], " ");
    let text = process_punctuation(text.trim());
    process_digits_and_articles(&text)
}

/// Punctuation next to a space is deleted, punctuation inside a word becomes a space (`yes/no`
/// -> `yes no`); a `.` not followed by a digit is deleted (decimal points stay).
fn process_punctuation(text: &str) -> String {
    let has_digit_comma_digit = has_digit_comma_digit(text);
    let mut out = text.to_string();
    for mark in PUNCTUATION {
        let next_to_space = text.contains(&format!("{mark} ")) || text.contains(&format!(" {mark}"));
        let replacement = if next_to_space || has_digit_comma_digit { "" } else { " " };
        out = out.replace(mark, replacement);
    }
    let chars: Vec<char> = out.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|&(index, &c)| c != '.' || chars.get(index + 1).is_some_and(|next| next.is_ascii_digit()))
        .map(|(_, &c)| c)
        .collect()
}

/// Whether the text has a digit, one or more commas, then a digit (`1,000`).
fn has_digit_comma_digit(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    (1..chars.len()).any(|start| {
        chars[start] == ',' && chars[start - 1].is_ascii_digit() && {
            let end = chars[start..].iter().position(|&c| c != ',').map(|offset| start + offset);
            end.is_some_and(|end| chars[end].is_ascii_digit())
        }
    })
}

fn process_digits_and_articles(text: &str) -> String {
    text.to_lowercase()
        .split_whitespace()
        .map(|word| NUMBERS.iter().find(|(name, _)| *name == word).map_or(word, |(_, digit)| digit))
        .filter(|word| !ARTICLES.contains(word))
        .map(|word| CONTRACTIONS.iter().find(|(short, _)| *short == word).map_or(word, |(_, full)| full))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punctuation_next_to_a_space_is_deleted_and_inside_a_word_is_a_space() {
        assert_eq!(normalize_vqa_answer("yes/no"), "yes no");
        assert_eq!(normalize_vqa_answer("red - white"), "red white");
        assert_eq!(normalize_vqa_answer("t-shirt"), "t shirt");
    }

    #[test]
    fn decimal_points_stay_and_sentence_periods_go() {
        assert_eq!(normalize_vqa_answer("3.5"), "3.5");
        assert_eq!(normalize_vqa_answer("It is 3."), "it is 3");
    }

    #[test]
    fn number_words_articles_and_contractions() {
        assert_eq!(normalize_vqa_answer("Ten"), "10");
        assert_eq!(normalize_vqa_answer("an apple and a pear"), "apple and pear");
        assert_eq!(normalize_vqa_answer("doesnt matter"), "doesn't matter");
        assert_eq!(normalize_vqa_answer("  the\tcat\n"), "cat");
    }

    #[test]
    fn thousands_separators_are_removed() {
        // Commas go in tokenisation; a remaining digit-comma-digit makes all punctuation vanish.
        assert_eq!(normalize_vqa_answer("1,000"), "1000");
        assert!(has_digit_comma_digit("1,,2") && !has_digit_comma_digit("a,2") && !has_digit_comma_digit("1,"));
    }

    #[test]
    fn possessive_is_split_off() {
        assert_eq!(normalize_vqa_answer("Man's hat"), "man 's hat");
    }
}
