//! A SentencePiece BPE model (`tokenizer.model`, what InternLM2 checkpoints ship instead of a
//! `tokenizer.json`) rebuilt as a `tokenizers` pipeline, as transformers' `convert_slow_tokenizer`
//! does: the pieces as the BPE vocabulary, merges ranked by the pieces' scores, byte fallback,
//! spaces as `▁`.

use std::path::Path;

use tokenizers::AddedToken;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};

use crate::error::{Error, Result};

/// The fields of SentencePiece's `ModelProto` (`sentencepiece_model.proto`) the conversion reads.
#[derive(Clone, PartialEq, prost::Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<Piece>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Piece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    /// 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    #[prost(int32, optional, tag = "3", default = "1")]
    r#type: Option<i32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TrainerSpec {
    /// 1 unigram, 2 BPE, 3 word, 4 char.
    #[prost(int32, optional, tag = "3", default = "1")]
    model_type: Option<i32>,
    #[prost(bool, optional, tag = "35", default = "false")]
    byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40", default = "0")]
    unk_id: Option<i32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3", default = "true")]
    add_dummy_prefix: Option<bool>,
    #[prost(bool, optional, tag = "4", default = "true")]
    remove_extra_whitespaces: Option<bool>,
}

const BPE_MODEL: i32 = 2;
const USER_DEFINED: i32 = 4;

/// Reads `tokenizer.model` and builds the tokenizer. `renamed` gives the ids whose piece the
/// checkpoint's `added_tokens_decoder` calls by another name (InternLM2 names its unused pieces
/// `<|im_end|>`, `<|im_start|>`, ...): the vocabulary takes those names.
pub(crate) fn from_file(path: &Path, renamed: &[(u32, String)]) -> Result<tokenizers::Tokenizer> {
    let fail = |reason: String| Error::Tokenizer(format!("{}: {reason}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let model = <ModelProto as prost::Message>::decode(bytes.as_slice())
        .map_err(|e| fail(format!("not a SentencePiece model: {e}")))?;
    let trainer = model.trainer_spec.clone().unwrap_or_default();
    let normalizer = model.normalizer_spec.clone().unwrap_or_default();
    if trainer.model_type() != BPE_MODEL {
        return Err(fail(format!("SentencePiece model type {} is not supported (only BPE)", trainer.model_type())));
    }
    if !normalizer.precompiled_charsmap().is_empty() || normalizer.remove_extra_whitespaces() {
        return Err(fail(format!(
            "SentencePiece normalization {:?} (character map or whitespace folding) is not supported",
            normalizer.name()
        )));
    }
    let mut pieces: Vec<String> = model.pieces.iter().map(|p| p.piece().to_string()).collect();
    for (id, name) in renamed {
        if let Some(piece) = pieces.get_mut(*id as usize) {
            piece.clone_from(name);
        }
    }
    let scores: Vec<f32> = model.pieces.iter().map(|p| p.score()).collect();
    let vocab: Vocab = pieces.iter().enumerate().map(|(id, piece)| (piece.clone(), id as u32)).collect();
    if vocab.len() != pieces.len() {
        return Err(fail("the model repeats a piece".into()));
    }
    let merges = merges(&pieces, &scores, &vocab);
    let unk = pieces.get(trainer.unk_id() as usize).cloned();
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(trainer.byte_fallback());
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk);
    }
    let mut tokenizer = tokenizers::Tokenizer::new(bpe.build().map_err(|e| fail(e.to_string()))?);
    let spaces = Replace::new(" ", "▁").map_err(|e| fail(e.to_string()))?;
    let as_spaces = Replace::new("▁", " ").map_err(|e| fail(e.to_string()))?;
    let mut decoders = vec![as_spaces.into(), ByteFallback::default().into(), Fuse::default().into()];
    if normalizer.add_dummy_prefix() {
        let prefixed = NormalizerSequence::new(vec![Prepend::new("▁".into()).into(), spaces.into()]);
        tokenizer.with_normalizer(Some(prefixed)).map_err(|e| fail(e.to_string()))?;
        decoders.push(Strip::new(' ', 1, 0).into());
    } else {
        tokenizer.with_normalizer(Some(spaces)).map_err(|e| fail(e.to_string()))?;
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    // SentencePiece never splits user-defined pieces; those the checkpoint renamed are added
    // under their new names by the caller.
    let user_defined = model.pieces.iter().enumerate().filter(|(id, piece)| {
        piece.r#type() == USER_DEFINED && !renamed.iter().any(|(renamed, _)| *renamed as usize == *id)
    });
    let atomic = user_defined.map(|(_, piece)| AddedToken::from(piece.piece().to_string(), false).normalized(false));
    tokenizer.add_tokens(atomic).map_err(|e| fail(e.to_string()))?;
    Ok(tokenizer)
}

/// Every split of a piece into two pieces of the vocabulary, ranked as transformers'
/// `SentencePieceExtractor` ranks them: by the merged piece's score (highest first), then by the
/// ids of the two halves.
fn merges(pieces: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (piece, &score) in pieces.iter().zip(scores) {
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                ranked.push((score, l, r, left, right));
            }
        }
    }
    // Stable: pieces with equal scores keep vocabulary order.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked.into_iter().map(|(_, _, _, left, right)| (left.to_string(), right.to_string())).collect()
}
