//! `Vlm`: a checkpoint's model, processor and generation defaults behind one call.
//!
//! ```no_run
//! use vlm::{GenerationConfig, Image, Message, Vlm};
//! let device = vlm::device::cpu();
//! let vlm = Vlm::from_pretrained("OpenGVLab/InternVL3-1B-hf", &device)?;
//! let messages = [Message::user().image(Image::open("street.jpg")?).text("What is happening here?")];
//! let config = GenerationConfig::default().max_new_tokens(256).temperature(0.7).seed(42);
//! let mut stream = vlm.stream(&messages, &config)?;
//! for delta in &mut stream {
//!     print!("{}", delta?);
//! }
//! let out = stream.finish()?; // text, token ids, stop reason, timings
//! println!("\n{} tokens, {:.1} tok/s", out.token_ids.len(), out.timings.decode_tokens_per_second());
//! # Ok::<(), vlm::Error>(())
//! ```

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;

use crate::config::CheckpointConfig;
use crate::error::Result;
use crate::generation::{Generation, GenerationConfig, GenerationDefaults, Generator};
use crate::loader::{LoadOptions, load_with, resolve};
use crate::models::Model;
use crate::processing::{Encoding, Message, ProcessOptions, Processor};

/// A loaded vision-language model, ready to answer.
pub struct Vlm {
    dir: PathBuf,
    checkpoint: CheckpointConfig,
    model: Model,
    processor: Processor,
    defaults: GenerationDefaults,
}

impl Vlm {
    /// Loads a checkpoint from a local directory or a Hugging Face repository id (downloaded into
    /// the standard cache with a progress bar; `HF_HUB_OFFLINE=1` uses the cache only).
    pub fn from_pretrained(id_or_dir: &str, device: &Device) -> Result<Self> {
        Self::from_dir(&resolve(id_or_dir)?, device)
    }

    /// [`from_pretrained`](Self::from_pretrained) with load options (e.g. 8- or 4-bit weights).
    pub fn from_pretrained_with(id_or_dir: &str, device: &Device, options: &LoadOptions) -> Result<Self> {
        Self::from_dir_with(&resolve(id_or_dir)?, device, options)
    }

    /// Loads a checkpoint directory without touching the network.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_dir_with(dir, device, &LoadOptions::default())
    }

    /// [`from_dir`](Self::from_dir) with load options.
    pub fn from_dir_with(dir: &Path, device: &Device, options: &LoadOptions) -> Result<Self> {
        let (checkpoint, model) = load_with(dir, device, options)?;
        let processor = Processor::from_dir(dir, &checkpoint)?;
        let mut defaults = GenerationDefaults::from_dir(dir)?;
        if defaults.eos_token_id.is_empty() {
            // Without it generation would run past the end of the answer to max_new_tokens.
            defaults.eos_token_id = processor.end_of_turn_token_ids();
        }
        Ok(Self { dir: dir.to_path_buf(), checkpoint, model, processor, defaults })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn checkpoint(&self) -> &CheckpointConfig {
        &self.checkpoint
    }

    /// The model, for callers with their own loop.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The processor (tokenizer, chat template, images).
    pub fn processor(&self) -> &Processor {
        &self.processor
    }

    /// The checkpoint's `generation_config.json`.
    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.defaults
    }

    /// Processes a conversation as `generate` would.
    pub fn encode(&self, messages: &[Message], config: &GenerationConfig) -> Result<Encoding> {
        let options = ProcessOptions {
            max_tiles: config.max_tiles,
            min_pixels: config.min_pixels,
            max_pixels: config.max_pixels,
            ..ProcessOptions::default()
        };
        self.processor.encode(messages, &options)
    }

    /// Generates the assistant's answer to a conversation.
    pub fn generate(&self, messages: &[Message], config: &GenerationConfig) -> Result<Generation> {
        self.stream(messages, config)?.finish()
    }

    /// Generates an answer as a stream of text deltas; [`TextStream::finish`] then gives the result.
    pub fn stream(&self, messages: &[Message], config: &GenerationConfig) -> Result<TextStream<'_>> {
        let started = Instant::now();
        config.validate()?;
        let encoding = self.encode(messages, config)?;
        let tokenizer = self.processor.tokenizer();
        let configs = std::slice::from_ref(config);
        let generator = Generator::new(&self.model, tokenizer, &[encoding], configs, &self.defaults, started)?;
        Ok(TextStream { generator, pending: VecDeque::new(), failed: false })
    }

    /// Generates for several conversations at once (left-padded into one batch); the results
    /// are in the same order, each as if generated alone.
    pub fn generate_batch(&self, conversations: &[Vec<Message>], config: &GenerationConfig) -> Result<Vec<Generation>> {
        let started = Instant::now();
        config.validate()?;
        let encodings =
            conversations.iter().map(|messages| self.encode(messages, config)).collect::<Result<Vec<_>>>()?;
        self.generate_encoded(&encodings, config, started)
    }

    /// Generates for conversations already [`encode`](Self::encode)d, as one batch; timings count
    /// from `started`. Lets a caller encode each conversation alone and set aside the ones that fail.
    pub fn generate_encoded(
        &self,
        encodings: &[Encoding],
        config: &GenerationConfig,
        started: Instant,
    ) -> Result<Vec<Generation>> {
        let configs = vec![config.clone(); encodings.len()];
        Generator::new(&self.model, self.processor.tokenizer(), encodings, &configs, &self.defaults, started)?.finish()
    }
}

/// Text deltas of one answer as they are generated. Deltas are whole UTF-8 characters and never
/// contain (part of) a stop string.
pub struct TextStream<'a> {
    generator: Generator<'a>,
    pending: VecDeque<String>,
    failed: bool,
}

impl TextStream<'_> {
    /// Runs generation to its end and returns the result (text, ids, stop reason, timings).
    pub fn finish(self) -> Result<Generation> {
        let mut results = self.generator.finish()?;
        Ok(results.remove(0))
    }
}

impl Iterator for TextStream<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(delta) = self.pending.pop_front() {
                return Some(Ok(delta));
            }
            if self.failed || self.generator.is_finished() {
                return None;
            }
            match self.generator.step() {
                Ok(mut deltas) => {
                    let delta = deltas.swap_remove(0);
                    if !delta.is_empty() {
                        self.pending.push_back(delta);
                    }
                }
                Err(error) => {
                    self.failed = true;
                    return Some(Err(error));
                }
            }
        }
    }
}
