//! The decode loop: prefill the prompts into a preallocated KV cache, then one token per step for
//! every sequence of the batch, until each stops.

use std::time::{Duration, Instant};

use burn::tensor::Tensor;

use super::config::{DEFAULT_MAX_NEW_TOKENS, GenerationConfig, GenerationDefaults};
use super::detokenizer::{IncrementalDecoder, StopCheck, StopStrings};
use super::sampler::Sampler;
use crate::error::{Error, Result};
use crate::models::{Model, ModelInputs, Pixels};
use crate::nn::KvCache;
use crate::processing::{Encoding, Tokenizer};

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// The text contained this stop string.
    StopString(String),
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// The model's context is full.
    ContextFull,
    /// The caller cancelled it (a client went away).
    Cancelled,
}

impl StopReason {
    /// OpenAI's `finish_reason`: `"stop"` or `"length"`.
    pub fn finish_reason(&self) -> &'static str {
        match self {
            StopReason::Eos | StopReason::StopString(_) | StopReason::Cancelled => "stop",
            StopReason::MaxNewTokens | StopReason::ContextFull => "length",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Eos => f.write_str("eos"),
            StopReason::StopString(_) => f.write_str("stop_string"),
            StopReason::MaxNewTokens => f.write_str("max_new_tokens"),
            StopReason::ContextFull => f.write_str("context_full"),
            StopReason::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Where the time went.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// From the start of the call (processing included) to the first generated token.
    pub time_to_first_token: Duration,
    /// The prompt's forward pass (vision, projector, decoder) and the first token.
    pub prefill: Duration,
    /// Every later token.
    pub decode: Duration,
    /// Prompt tokens of the whole batch.
    pub prefill_tokens: usize,
    /// Tokens generated after the first one, whole batch.
    pub decode_tokens: usize,
}

impl Timings {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        per_second(self.prefill_tokens, self.prefill)
    }

    /// Generated tokens per second after the first one (whole batch).
    pub fn decode_tokens_per_second(&self) -> f64 {
        per_second(self.decode_tokens, self.decode)
    }
}

fn per_second(tokens: usize, time: Duration) -> f64 {
    if time.is_zero() { 0.0 } else { tokens as f64 / time.as_secs_f64() }
}

/// The result of generating for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated text (special tokens and a stop string left out).
    pub text: String,
    /// The generated token ids (an end-of-sequence token included).
    pub token_ids: Vec<u32>,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Why generation stopped.
    pub stop_reason: StopReason,
    /// Timings of the call (shared by every sequence of a batch).
    pub timings: Timings,
}

/// One sequence's state.
struct Row {
    /// Prompt and generated tokens (for the repetition penalty).
    tokens: Vec<u32>,
    prompt_tokens: usize,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    /// Stop strings that are single special tokens (`"<|im_end|>"`): decoded text never shows
    /// them, so they are matched as token ids.
    stop_tokens: Vec<(u32, String)>,
    eos: Vec<u32>,
    max_new_tokens: usize,
    stopped: Option<StopReason>,
}

/// Generates for a batch of processed prompts, one step at a time.
pub struct Generator<'a> {
    model: &'a Model,
    tokenizer: &'a Tokenizer,
    cache: KvCache,
    rows: Vec<Row>,
    /// Which row each batch row of the cache holds: rows that stop leave the batch.
    running: Vec<usize>,
    /// The last position's logits of each row in `running`, on the host.
    logits: Vec<Vec<f32>>,
    /// Longest sequence (prompt and generated tokens, padding not counted) the model takes.
    context: usize,
    pad: u32,
    started: Instant,
    timings: Timings,
    first_token_at: Option<Instant>,
}

impl<'a> Generator<'a> {
    /// Runs the prefill of `prompts` (left-padded to one length) and gets ready to sample, each
    /// prompt with its own settings (`configs[i]` for `prompts[i]`). `started` is when the caller's
    /// request began (for time to first token).
    pub fn new(
        model: &'a Model,
        tokenizer: &'a Tokenizer,
        prompts: &[Encoding],
        configs: &[GenerationConfig],
        defaults: &GenerationDefaults,
        started: Instant,
    ) -> Result<Self> {
        if prompts.is_empty() {
            return Err(Error::Input("nothing to generate for: no prompts".into()));
        }
        if configs.len() != prompts.len() {
            return Err(Error::Input(format!("{} generation configs for {} prompts", configs.len(), prompts.len())));
        }
        for config in configs {
            config.validate()?;
        }
        let image_tokens = model.image_token_ids();
        let pad = defaults
            .pad_token_id
            .into_iter()
            .chain(defaults.eos_token_id.iter().copied())
            .chain([0])
            .find(|id| !image_tokens.contains(id))
            .unwrap_or(0);
        let max_new = |config: &GenerationConfig| {
            config.max_new_tokens.or(defaults.max_new_tokens).unwrap_or(DEFAULT_MAX_NEW_TOKENS)
        };
        let max_new_tokens = configs.iter().map(max_new).max().unwrap_or(0);
        let longest = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
        let context = model.context_length();
        if longest == 0 {
            return Err(Error::Input("empty prompt".into()));
        }
        if longest >= context {
            return Err(Error::ContextOverflow { requested: longest + 1, limit: context });
        }
        let padding: Vec<usize> = prompts.iter().map(|p| longest - p.input_ids.len()).collect();
        // Each row may grow to the context on its own; its padding comes on top.
        let most_padding = padding.iter().copied().max().unwrap_or(0);
        let capacity = (longest + max_new_tokens).min(context + most_padding);
        let input_ids: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&padding)
            .map(|(p, &pad_len)| std::iter::repeat_n(pad, pad_len).chain(p.input_ids.iter().copied()).collect())
            .collect();
        let device = model.device();
        let pixels = Pixels::cat(prompts.iter().filter_map(|p| p.pixels(&device)).collect())?;
        let mut cache = model.new_cache(prompts.len(), capacity).with_left_padding(padding)?;

        let prefill_start = Instant::now();
        let inputs = ModelInputs { input_ids, pixels };
        let hidden = model.hidden_states(&inputs, &mut cache)?;
        let logits = last_position_logits(model, hidden)?;

        let rows = prompts
            .iter()
            .zip(configs)
            .map(|(p, config)| Row {
                tokens: p.input_ids.clone(),
                prompt_tokens: p.input_ids.len(),
                sampler: Sampler::new(config, defaults),
                decoder: IncrementalDecoder::new(),
                stops: StopStrings::new(
                    config.stop.iter().filter(|stop| special_token(tokenizer, stop).is_none()).cloned().collect(),
                ),
                stop_tokens: config
                    .stop
                    .iter()
                    .filter_map(|stop| special_token(tokenizer, stop).map(|id| (id, stop.clone())))
                    .collect(),
                eos: config.eos_token_ids.clone().unwrap_or_else(|| defaults.eos_token_id.clone()),
                max_new_tokens: max_new(config),
                stopped: (max_new(config) == 0).then_some(StopReason::MaxNewTokens),
            })
            .collect();
        let timings = Timings {
            prefill: prefill_start.elapsed(),
            prefill_tokens: prompts.iter().map(|p| p.input_ids.len()).sum(),
            ..Timings::default()
        };
        let running = (0..prompts.len()).collect();
        let mut generator = Self {
            model,
            tokenizer,
            cache,
            rows,
            running,
            logits,
            context,
            pad,
            started,
            timings,
            first_token_at: None,
        };
        generator.release_finished_rows()?;
        Ok(generator)
    }

    /// Whether every sequence has stopped.
    pub fn is_finished(&self) -> bool {
        self.rows.iter().all(|row| row.stopped.is_some())
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the batch is empty (never: construction needs a prompt).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Sequences still in the batch the decoder runs (finished ones leave it).
    pub fn batch_rows(&self) -> usize {
        if self.is_finished() { 0 } else { self.running.len() }
    }

    /// Whether sequence `row` has stopped.
    pub fn is_row_finished(&self, row: usize) -> bool {
        self.rows.get(row).is_none_or(|row| row.stopped.is_some())
    }

    /// Stops sequence `row` (its client went away); the others go on.
    pub fn cancel(&mut self, row: usize) {
        if let Some(row) = self.rows.get_mut(row) {
            row.stopped.get_or_insert(StopReason::Cancelled);
        }
    }

    /// The result of sequence `row` so far (final once it has stopped).
    pub fn generation(&self, row: usize) -> Generation {
        let row = &self.rows[row];
        Generation {
            text: row.stops.released().to_string(),
            token_ids: row.tokens[row.prompt_tokens..].to_vec(),
            prompt_tokens: row.prompt_tokens,
            stop_reason: row.stopped.clone().unwrap_or(StopReason::MaxNewTokens),
            timings: self.timings,
        }
    }

    /// Samples one token for every running sequence and runs the decoder on them. Returns the text
    /// each sequence produced in this step (often empty: an incomplete character, a possible stop).
    pub fn step(&mut self) -> Result<Vec<String>> {
        let mut deltas = vec![String::new(); self.rows.len()];
        if self.is_finished() {
            return Ok(deltas);
        }
        for (slot, &index) in self.running.iter().enumerate() {
            let row = &mut self.rows[index];
            if row.stopped.is_some() {
                continue; // cancelled since the last step
            }
            let logits = &mut self.logits[slot];
            if !logits.iter().all(|value| value.is_finite()) {
                return Err(Error::NonFinite { stage: "decoder logits" });
            }
            let token = row.sampler.next_token(logits, &row.tokens);
            row.tokens.push(token);
            let generated = row.tokens.len() - row.prompt_tokens;
            let mut delta = String::new();
            if row.eos.contains(&token) {
                row.stopped = Some(StopReason::Eos);
            } else if let Some((_, stop)) = row.stop_tokens.iter().find(|(id, _)| *id == token) {
                row.stopped = Some(StopReason::StopString(stop.clone()));
            } else if let Some(text) = row.decoder.push(self.tokenizer, token)? {
                append(row, &text, &mut delta);
                if let Some(StopReason::StopString(stop)) = &row.stopped {
                    let needed = tokens_through_stop(self.tokenizer, &row.tokens[row.prompt_tokens..], stop)?;
                    row.tokens.truncate(row.prompt_tokens + needed);
                }
            }
            if row.stopped.is_none() && generated >= row.max_new_tokens {
                row.stopped = Some(StopReason::MaxNewTokens);
            }
            if row.stopped.is_none() && row.tokens.len() >= self.context {
                row.stopped = Some(StopReason::ContextFull);
            }
            if matches!(row.stopped, Some(ref reason) if !matches!(reason, StopReason::StopString(_))) {
                // Release what was held back: an incomplete character or a possible stop string.
                if let Some(text) = row.decoder.flush(self.tokenizer)? {
                    append(row, &text, &mut delta);
                }
                delta.push_str(&row.stops.finish());
            }
            deltas[index] = delta;
        }
        let now = Instant::now();
        let first = *self.first_token_at.get_or_insert_with(|| {
            self.timings.time_to_first_token = now - self.started;
            now
        });
        self.release_finished_rows()?;
        if self.is_finished() {
            self.timings.decode = now - first;
            return Ok(deltas);
        }
        let next: Vec<Vec<u32>> =
            self.running.iter().map(|&index| vec![*self.rows[index].tokens.last().unwrap_or(&self.pad)]).collect();
        let inputs = ModelInputs { input_ids: next, pixels: None };
        let hidden = self.model.hidden_states(&inputs, &mut self.cache)?;
        self.logits = last_position_logits(self.model, hidden)?;
        self.timings.decode_tokens += self.running.len();
        self.timings.decode = Instant::now() - first;
        Ok(deltas)
    }

    /// Takes rows that have stopped (or were cancelled) out of the batch, so the others decode
    /// alone: a finished row costs no more compute.
    fn release_finished_rows(&mut self) -> Result<()> {
        let keep: Vec<usize> =
            (0..self.running.len()).filter(|&slot| self.rows[self.running[slot]].stopped.is_none()).collect();
        if keep.len() == self.running.len() || keep.is_empty() {
            return Ok(());
        }
        self.cache.retain_rows(&keep)?;
        self.running = keep.iter().map(|&slot| self.running[slot]).collect();
        let mut logits = std::mem::take(&mut self.logits);
        self.logits = keep.iter().map(|&slot| std::mem::take(&mut logits[slot])).collect();
        Ok(())
    }

    /// Runs to the end and returns every sequence's result, in prompt order.
    pub fn finish(mut self) -> Result<Vec<Generation>> {
        while !self.is_finished() {
            self.step()?;
        }
        Ok((0..self.rows.len()).map(|row| self.generation(row)).collect())
    }
}

/// Passes decoded text through the stop-string watcher, collecting what may be shown.
fn append(row: &mut Row, text: &str, delta: &mut String) {
    match row.stops.push(text) {
        StopCheck::Continue(safe) => delta.push_str(&safe),
        StopCheck::Stop(last, stop) => {
            delta.push_str(&last);
            row.stopped = Some(StopReason::StopString(stop));
        }
    }
}

/// The id of `text` when it is one special token of the tokenizer.
fn special_token(tokenizer: &Tokenizer, text: &str) -> Option<u32> {
    tokenizer.token_id(text).filter(|&id| tokenizer.is_special(id))
}

/// After a stop string: how many of the `generated` tokens are needed to produce the text up to
/// and including it. Tokens beyond are dropped (several tokens can be released at once when they
/// complete one character, and the stop string can end before the last of them).
fn tokens_through_stop(tokenizer: &Tokenizer, generated: &[u32], stop: &str) -> Result<usize> {
    let mut needed = generated.len();
    while needed > 1 && tokenizer.decode(&generated[..needed - 1], true)?.contains(stop) {
        needed -= 1;
    }
    Ok(needed)
}

/// Logits of the last position of each row, copied to the host as f32.
fn last_position_logits(model: &Model, hidden: Tensor<3>) -> Result<Vec<Vec<f32>>> {
    let [batch, seq_len, _] = hidden.dims();
    let logits = model.logits(hidden.narrow(1, seq_len - 1, 1)); // [batch, 1, vocab]
    let [_, _, vocab] = logits.dims();
    let values = logits
        .cast(burn::tensor::DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| Error::Input(format!("reading logits: {e:?}")))?;
    Ok(values.chunks(vocab).take(batch).map(<[f32]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_after_a_stop_string_are_not_kept() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/internvl3-hf");
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let before = tokenizer.encode("The cat STOP").unwrap();
        // Byte-level pieces: this character takes more than one token, released together.
        let after = tokenizer.encode("猫").unwrap();
        assert!(after.len() > 1, "{after:?}");
        let generated: Vec<u32> = before.iter().chain(&after).copied().collect();
        assert_eq!(tokens_through_stop(&tokenizer, &generated, "STOP").unwrap(), before.len());
        assert_eq!(tokens_through_stop(&tokenizer, &generated, "猫").unwrap(), generated.len());
    }
}
