//! The checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` crate, or rebuilt from
//! the slow tokenizer's files when that is all a checkpoint ships: a byte-level BPE from
//! `vocab.json` + `merges.txt` (Qwen2's pipeline), or a SentencePiece BPE from `tokenizer.model`
//! (InternLM2's).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// transformers' `Qwen2Tokenizer` pre-tokenization pattern.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A token written either as a string or as `{"content": ...}` in tokenizer_config.json.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum TokenSpec {
    Plain(String),
    Added { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(content) | TokenSpec::Added { content } => content,
        }
    }
}

#[derive(Deserialize)]
struct AddedTokenJson {
    content: String,
    #[serde(default)]
    special: bool,
}

/// The fields of `tokenizer_config.json` this crate reads.
#[derive(Deserialize, Default)]
pub(crate) struct TokenizerConfig {
    pub bos_token: Option<TokenSpec>,
    pub eos_token: Option<TokenSpec>,
    pub chat_template: Option<serde_json::Value>,
    #[serde(default)]
    added_tokens_decoder: BTreeMap<String, AddedTokenJson>,
}

impl TokenizerConfig {
    /// The `added_tokens_decoder` entries as (id, content), by id.
    pub(crate) fn added_tokens(&self) -> Result<Vec<(u32, String)>> {
        let mut added = self
            .added_tokens_decoder
            .iter()
            .map(|(id, token)| {
                let id = id.parse::<u32>().map_err(|e| Error::Tokenizer(format!("added token id {id:?}: {e}")))?;
                Ok((id, token.content.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        added.sort_by_key(|(id, _)| *id);
        Ok(added)
    }

    pub(crate) fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|source| Error::Json { path, source })
    }
}

/// Text <-> token ids for one checkpoint.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`, or `vocab.json` + `merges.txt`, plus the special tokens of
    /// `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = TokenizerConfig::from_dir(dir)?;
        let json = dir.join("tokenizer.json");
        let inner = if json.exists() {
            tokenizers::Tokenizer::from_file(&json).map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?
        } else if dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
            byte_level_bpe(dir, &config)?
        } else if dir.join("tokenizer.model").exists() {
            let mut tokenizer = super::sentencepiece::from_file(&dir.join("tokenizer.model"), &config.added_tokens()?)?;
            add_config_tokens(&mut tokenizer, &config, dir)?;
            tokenizer
        } else {
            return Err(Error::Tokenizer(format!(
                "{} has none of tokenizer.json, vocab.json + merges.txt, tokenizer.model",
                dir.display()
            )));
        };
        Ok(Self {
            inner,
            bos_token: config.bos_token.as_ref().map(|t| t.content().to_string()),
            eos_token: config.eos_token.as_ref().map(|t| t.content().to_string()),
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their ids;
    /// nothing is added around the text (the chat template does that).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of a rendered prompt, as transformers' processors tokenize a chat template's
    /// output: the tokenizer's own special tokens (a `<s>` its post-processor adds, as Llama's
    /// does) are added unless the prompt already starts with the BOS token.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let starts_with_bos = self.bos_token.as_deref().is_some_and(|bos| !bos.is_empty() && prompt.starts_with(bos));
        let encoding = self.inner.encode(prompt, !starts_with_bos).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, without special tokens when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a token given by its text (`"<IMG_CONTEXT>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Checks that `token` is token `id` here, as the checkpoint's `config.json` (at `config`)
    /// says: a mismatch would put image features on the wrong tokens.
    pub(crate) fn check_token_id(&self, token: &str, id: u32, config: &Path) -> Result<()> {
        let found = self.token_id(token);
        if found != Some(id) {
            return Err(Error::config(
                config,
                format!("token id {id} differs from the tokenizer's {token} ({found:?})"),
            ));
        }
        Ok(())
    }

    /// The text of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The beginning-of-sequence token, as the chat template sees it.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The end-of-sequence token named in tokenizer_config.json.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Whether `id` is a special (added, control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_tokens_decoder().get(&id).is_some_and(|token| token.special)
    }
}

/// Qwen2's fast tokenizer rebuilt from its slow files: NFC, the Qwen2 split pattern, byte-level
/// BPE, and the added tokens of tokenizer_config.json at their ids.
fn byte_level_bpe(dir: &Path, config: &TokenizerConfig) -> Result<tokenizers::Tokenizer> {
    let fail = |e: &dyn std::fmt::Display| Error::Tokenizer(format!("{}: {e}", dir.display()));
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy()).build().map_err(|e| fail(&e))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NFC)).map_err(|e| fail(&e))?;
    let split = Split::new(SplitPattern::Regex(QWEN2_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| fail(&e))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    add_config_tokens(&mut tokenizer, config, dir)?;
    Ok(tokenizer)
}

/// Adds the `added_tokens_decoder` of tokenizer_config.json at the ids it gives (special ones
/// never split and hidden when decoding with `skip_special_tokens`).
fn add_config_tokens(tokenizer: &mut tokenizers::Tokenizer, config: &TokenizerConfig, dir: &Path) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| Error::Tokenizer(format!("{}: {e}", dir.display()));
    for (id, content) in config.added_tokens()? {
        let special = config.added_tokens_decoder.get(&id.to_string()).is_some_and(|token| token.special);
        let spec = AddedToken::from(content.clone(), special);
        if special {
            tokenizer.add_special_tokens([spec]).map_err(|e| fail(&e))?;
        } else {
            tokenizer.add_tokens([spec]).map_err(|e| fail(&e))?;
        }
        let got = tokenizer.token_to_id(&content);
        if got != Some(id) {
            return Err(fail(&format!("added token {content:?} got id {got:?}, tokenizer_config.json says {id}")));
        }
    }
    Ok(())
}
