//! Turning a growing list of token ids into text deltas: never half a character, and never text
//! that might turn out to be the start of a stop string.

use crate::error::Result;
use crate::processing::Tokenizer;

/// Decodes tokens one at a time into complete UTF-8 text (the offsets scheme of transformers'
/// `TextStreamer` and text-generation-inference): a token that ends inside a multi-byte character
/// yields nothing until the character is complete.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token and returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(Some(delta));
        }
        Ok(None)
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.strip_prefix(prefix.as_str()).filter(|rest| !rest.is_empty()).map(String::from))
    }
}

/// Watches generated text for stop strings, releasing only text that cannot be part of one.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// All text seen.
    text: String,
    /// How much of `text` has been released.
    released: usize,
}

/// What a piece of new text did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// Generation goes on; this text is safe to show (possibly empty).
    Continue(String),
    /// A stop string appeared: show this last text (the stop string excluded) and stop.
    Stop(String, String),
}

impl StopStrings {
    /// Watches for `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, text: String::new(), released: 0 }
    }

    /// The released text so far.
    pub fn released(&self) -> &str {
        &self.text[..self.released]
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, delta: &str) -> StopCheck {
        // A stop string can only end in the new text; start looking where it could begin.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let search_from = floor_char_boundary(&self.text, self.text.len().saturating_sub(longest));
        self.text.push_str(delta);
        let found = self
            .stops
            .iter()
            .filter_map(|stop| self.text[search_from..].find(stop.as_str()).map(|at| (search_from + at, stop)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, stop)) = found {
            let at = at.max(self.released);
            let last = self.text[self.released..at].to_string();
            self.text.truncate(at);
            self.released = at;
            return StopCheck::Stop(last, stop.clone());
        }
        // Hold back the longest tail that is the beginning of some stop string.
        let held = self
            .stops
            .iter()
            .flat_map(|stop| (1..stop.len()).rev().filter(move |&n| stop.is_char_boundary(n)).map(move |n| &stop[..n]))
            .filter(|prefix| self.text[self.released..].ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let safe = self.text.len() - held;
        let out = self.text[self.released..safe].to_string();
        self.released = safe;
        StopCheck::Continue(out)
    }

    /// Releases whatever was held back (generation ended for another reason).
    pub fn finish(&mut self) -> String {
        let out = self.text[self.released..].to_string();
        self.released = self.text.len();
        out
    }
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut watcher = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut shown = String::new();
        for piece in pieces {
            match watcher.push(piece) {
                StopCheck::Continue(text) => shown.push_str(&text),
                StopCheck::Stop(text, stop) => {
                    shown.push_str(&text);
                    return (shown, Some(stop));
                }
            }
        }
        shown.push_str(&watcher.finish());
        (shown, None)
    }

    #[test]
    fn stop_string_split_across_pieces_is_never_shown() {
        assert_eq!(stream(&["STOP"], &["hello ST", "O", "P world"]), ("hello ".into(), Some("STOP".into())));
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        assert_eq!(stream(&["STOP"], &["a ST", "ay"]), ("a STay".into(), None));
        assert_eq!(stream(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(stream(&["cd", "bc"], &["abcd"]), ("a".into(), Some("bc".into())));
    }

    #[test]
    fn multibyte_stop_strings_hold_back_on_char_boundaries() {
        assert_eq!(stream(&["été"], &["un é", "t", "é fini"]), ("un ".into(), Some("été".into())));
    }
}
