#!/usr/bin/env python3
"""Build the parity fixtures: tiny random-weight InternVL / NVLM-D checkpoints saved by HuggingFace
transformers itself, plus the reference activations that `vlm`'s tests compare against.

    pip install torch torchvision transformers sentencepiece protobuf   # CPU is enough; ~5 GB of wheels
    python3 scripts/make_fixtures.py                  # writes tests/fixtures/ (~30 s on 2 cores)
    python3 scripts/make_fixtures.py --only internvl2-internlm2,internvl-rope-dynamic
                                                      # rewrites only those groups, nothing else

Everything is seeded, so a re-run rewrites the same files (up to library version changes). No network
is needed: the tokenizers are trained here on a small built-in corpus. Groups (`--only`): internvl3,
internvl2-llama-untied, nvlm-d, processor, internvl2-internlm2, internvl-rope-linear, internvl-rope-dynamic,
internvl-rope-llama3, internvl-rope-yarn, and the Qwen-VL groups qwen_vl_processor, qwen2_5_vl, qwen3_vl (written
by scripts/fixtures_qwen_vl.py, whose docstring documents them), the LLaVA-architecture groups pixtral, llava,
llava_processor (written by scripts/fixtures_llava.py, likewise), and the Nemotron groups nemotron_h, nemotron_omni
(written by scripts/fixtures_nemotron.py, likewise). Without `--only` models/, reference/ and tokenizer/ are wiped
first.

Layout of the output:
    tests/fixtures/models/<name>/      a checkpoint as a user would download it (config.json, weights,
                                       tokenizer.json, tokenizer_config.json, generation_config.json, ...)
    tests/fixtures/reference/<weights>.safetensors  reference activations for one set of weights
    tests/fixtures/reference/<weights>.json         what it was computed with, and which checkpoints
                                                    hold those weights
    tests/fixtures/tokenizer/internlm2.json         InternLM2 (SentencePiece) tokenizer cases: pieces and ids
                                                    of test strings, decodes, and the InternVL chat prompt

Models (every parameter re-randomised; default init leaves norms at 1 and biases at 0, hiding bugs):
    internvl3-hf           transformers layout (InternVLForConditionalGeneration), LayerNorm ViT with
                           qkv bias, tied Qwen2 decoder, transformers-5 config spellings
    internvl3-original     the same weights in the OpenGVLab layout (InternVLChatModel: fused qkv,
                           mlp1.*), transformers-4 config spellings (rope_theta, torch_dtype)
    internvl3-hf-sharded   the same weights again, split over three safetensors shards
    internvl3-hf-bf16      the same weights rounded to bfloat16 and saved as bf16
    internvl2-llama-untied OpenGVLab layout, Llama decoder without qkv bias and with an untied lm_head,
                           pixel shuffle v1 and features from the second-to-last ViT layer
    nvlm-d                 NVLM-D layout (NVLM_D config): RMSNorm ViT with qk-norm and no qkv bias,
                           bias-free projector as wide as the decoder's MLP, untied Qwen2 decoder
    internvl2-internlm2    OpenGVLab layout with an InternLM2 decoder, as InternVL2-2B/8B/26B and
                           InternVL2_5-2B/8B/26B: llm_config InternLM2ForCausalLM (`bias: false`, rope_scaling
                           {"type": "dynamic", "factor": 2.0} with max_position_embeddings 32768, so inactive),
                           8 query / 2 KV heads of 8, `attention.wqkv` interleaved per KV group, `attention.wo`,
                           `feed_forward.w1/w3/w2`, `attention_norm`, `ffn_norm`, untied `output`; a SentencePiece
                           BPE tokenizer.model (no tokenizer.json) with InternLM2's settings; prompt = what
                           InternVL's `model.chat()` builds (internlm2-chat template, BOS). The reference is
                           transformers' Llama decoder (what convert_internvl_weights_to_hf.py maps InternLM2
                           onto); the export is checked against an independent InternLM2 forward.
    internvl-rope-linear   transformers layout, untied Llama decoder (head_dim 16), rope_parameters
                           {"rope_type": "linear", "factor": 2.0}
    internvl-rope-dynamic  the same with {"rope_type": "dynamic", "factor": 2.0} and max_position_embeddings 32
                           under a 39-token prompt: inv_freq is recomputed at every forward (prompt and each
                           cached decode step); the reference records seq_len and inv_freq per forward
    internvl-rope-llama3   {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 8.0, "original_max_position_embeddings": 256}: 2 high, 2 medium
                           (smoothed) and 4 low frequencies
    internvl-rope-yarn     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}:
                           ramp over dims 0..3, attention scaling 0.1 ln(4) + 1 on cos and sin
    The RoPE and InternLM2 references also hold `greedy_step_logits` [steps, vocab] (the logits of every
    greedy step, with the KV cache); the RoPE ones `rope_inv_freq` [steps, head_dim/2], `rope_seq_len`,
    `rope_attention_scaling` per decoder forward (step 0 = the prompt).
    qwen2_5-vl, qwen2_5-vl-hf5, qwen2_5-vl-tied, qwen3-vl: see scripts/fixtures_qwen_vl.py.
    pixtral, pixtral-hf5, llava, llava-nobias: see scripts/fixtures_llava.py.
    nemotron-h, nemotron-h-hub, nemotron-omni: see scripts/fixtures_nemotron.py.
"""

import argparse
import copy
import json
import math
import shutil
from pathlib import Path

import numpy
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from PIL import Image
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
from transformers import (
    GenerationConfig,
    GotOcr2ImageProcessor,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    Qwen2Tokenizer,
)

SEED = 1234
TILE = 112          # image size of one tile (448 in real checkpoints); 8x8 patches of 14
PATCH = 14
TOKENS_PER_TILE = (TILE // PATCH // 2) ** 2  # after pixel shuffle with ratio 0.5: 16
GREEDY_TOKENS = 8
MIN_MARGIN = 0.01   # smallest top-1/top-2 logit gap accepted at every greedy step
NEW_MIN_MARGIN = 0.05  # the same, for the fixtures added with the InternLM2 / RoPE-scaling work

# ------------------------------------------------------------------------------------------------
# Tokenizer: a byte-level BPE trained here, wrapped as a Qwen2 tokenizer with the chat and image
# special tokens of the real checkpoints.
# ------------------------------------------------------------------------------------------------

CORPUS = """
A photo of a cat sitting on a red sofa next to a window. The dog is running in the park.
What is in this image? Describe the picture in detail. How many people are there?
The chart shows the revenue of the company from 2019 to 2023, growing every year.
Please answer the question with a single word or phrase. Answer with the option's letter.
There is a street with cars, a bus, traffic lights and tall buildings on both sides.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?
Image-1: Image-2: <image> user assistant system You are a helpful assistant.
Le chat est sur le canapé. Der Hund läuft im Park. 猫がソファの上に座っています。图片里有什么？
"""

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
]

# transformers-layout checkpoints (InternVL3-*-hf): structured content, the image-context token
# as the image placeholder, which the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# OpenGVLab-layout checkpoints keep a string-content ChatML template in tokenizer_config.json, with a
# default system message; images are `<image>` markers in the text that the model code expands.
ORIGINAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
MAX_TILES = 6


def train_bpe():
    """The 400-piece byte-level BPE every Qwen2-style fixture tokenizer is built on: (vocab, merges)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([CORPUS] * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def build_tokenizer():
    vocab, merges = train_bpe()
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for t in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id or t == tok.unk_token, t
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 512
    return tok


# ------------------------------------------------------------------------------------------------
# InternLM2 tokenizer (InternVL2/2.5-2B/8B/26B): a SentencePiece BPE `tokenizer.model` read by the
# remote-code slow tokenizer `tokenization_internlm2.InternLM2Tokenizer`; no tokenizer.json.
# ------------------------------------------------------------------------------------------------

# InternVL's `internlm2-chat` conversation template (conversation.py; config "template" of InternVL2-2B/8B/26B):
# ChatML with this default system message, separator "<|im_end|>" (no newline after it).
INTERNVL_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
# `internvl2_5` template (InternVL2.5 checkpoints): another system message, separator "<|im_end|>\n".
INTERNVL2_5_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

# Extra training text: the system message (so its characters are pieces, as in the real 92k vocabulary),
# indentation, runs of spaces and newlines.
INTERNLM2_CORPUS_EXTRA = INTERNVL_SYSTEM_MESSAGE + """
def main():
    for i in range(10):
        print("hello world", i)
    return 0

The  answer   is    here.
Line one
Line two

Please describe the image in detail.
"""

# The last pieces of InternLM2's tokenizer.model are placeholders `[UNUSED_TOKEN_k]`; tokenizer_config.json's
# added_tokens_decoder renames the last six (ids 92538..92543 in the real model) to the chat tokens.
INTERNLM2_PLACEHOLDERS = 8
INTERNLM2_CHAT_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                         "<|im_start|>"]
# Added by InternVL's fine-tuning (`tokenizer.add_tokens(..., special_tokens=True)`) after the sentencepiece vocab
# (ids 92544..92552 in the real model, config vocab_size 92553).
INTERNVL_ADDED_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]

# tokenizer_config.json chat_template of internlm/internlm2-chat-* (InternVL2's InternLM2 checkpoints inherit it).
# Note: it starts with the BOS *text* and puts "\n" after <|im_end|>; the model's own `chat()` (conversation.py,
# template `internlm2-chat`, separator style MPT) does neither: BOS comes from the tokenizer and turns are glued.
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_internlm2_sentencepiece():
    """Train a tiny SentencePiece BPE with InternLM2's normalizer/trainer settings and append the placeholder
    pieces at the end. Returns the serialized ModelProto (tokenizer.model bytes). Deterministic."""
    import io
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2  # needs `protobuf`

    lines = [line for line in (CORPUS + INTERNLM2_CORPUS_EXTRA).split("\n") if line]
    # A few samples that contain newlines, so "\n" is a piece of its own (and "\n\n" a merge).
    lines += ["Line one\nLine two\n\nLine three", "user\nassistant\nsystem\n"] * 2
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=model,
        model_type="bpe", vocab_size=480, hard_vocab_limit=False, character_coverage=1.0,
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1, minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    first = 147 - INTERNLM2_PLACEHOLDERS  # the real ones end with [UNUSED_TOKEN_146]
    for k in range(first, 147):
        piece = proto.pieces.add()
        piece.piece = f"[UNUSED_TOKEN_{k}]"
        piece.score = 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()


class InternLM2TokenizerMirror:
    """What `tokenization_internlm2.InternLM2Tokenizer` (the slow, remote-code tokenizer the InternVL2 model cards
    load with `use_fast=False`) computes under transformers 4.37 (the version the checkpoints pin):

    encode: transformers' `PreTrainedTokenizer.tokenize` splits the text on every added token (a trie,
            longest match first; every added token has lstrip = rstrip = single_word = false, so no whitespace is
            eaten around them), each remaining piece goes through `sp_model.encode(piece, out_type=str)` on its
            own (so each piece starts a fresh sentencepiece "sentence"; the model has add_dummy_prefix=false, so
            no "▁" is prepended, neither at the start nor after a special token), pieces map back with
            `piece_to_id`; added tokens map through added_tokens_decoder (which overrides the placeholder
            pieces). `add_special_tokens=True` prepends BOS (<s>, id 1; `add_bos_token: true`), no EOS.
    decode: transformers 4.37 `PreTrainedTokenizer._decode` around InternLM2's `convert_tokens_to_string`."""

    def __init__(self, model_bytes):
        import sentencepiece as spm
        from transformers.tokenization_python import Trie

        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.sp_size = self.sp.get_piece_size()
        self.added = {"<unk>": 0, "<s>": 1, "</s>": 2}
        for i, token in enumerate(INTERNLM2_CHAT_TOKENS):
            self.added[token] = self.sp_size - len(INTERNLM2_CHAT_TOKENS) + i
        for i, token in enumerate(INTERNVL_ADDED_TOKENS):
            self.added[token] = self.sp_size + i
        self.id_to_added = {v: k for k, v in self.added.items()}
        self.bos_id, self.eos_id, self.unk_id = 1, 2, 0
        self.additional_special_tokens = ([INTERNLM2_CHAT_TOKENS[i] for i in (5, 4, 3, 2, 1, 0)]
                                          + INTERNVL_ADDED_TOKENS)
        # all_special_tokens in 4.37: bos, eos, unk, pad (= eos), then additional_special_tokens
        self.all_special_tokens = list(dict.fromkeys(["<s>", "</s>", "<unk>", "</s>"] + self.additional_special_tokens))
        self.all_special_ids = [self.added[t] for t in self.all_special_tokens]
        self.trie = Trie()
        for token in self.added:
            self.trie.add(token)

    def __len__(self):
        return self.sp_size + len(INTERNVL_ADDED_TOKENS)

    def token_to_id(self, token):
        return self.added[token] if token in self.added else self.sp.piece_to_id(token)

    def tokenize(self, text):
        pieces = []
        for part in self.trie.split(text):
            if not part:
                continue
            if part in self.added:
                pieces.append(part)
            else:
                pieces.extend(self.sp.encode(part, out_type=str))
        return pieces

    def encode(self, text, add_special_tokens=True):
        ids = [self.token_to_id(p) for p in self.tokenize(text)]
        return ([self.bos_id] if add_special_tokens else []) + ids

    @staticmethod
    def clean_up_tokenization(text):
        return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
                .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
                .replace(" 've", "'ve").replace(" 're", "'re"))

    def convert_tokens_to_string(self, tokens):
        """InternLM2Tokenizer.convert_tokens_to_string, verbatim in behaviour: a space before each special token
        that follows a non-special one, clean_up_tokenization applied unconditionally, and
        `_maybe_add_prefix_space` always adding a space (it tests a token *string* against a set of *ids*)
        that `[1:]` then removes again."""
        current, out, prev_is_special = [], "", False
        for token in tokens:
            if token in self.all_special_tokens:
                if not prev_is_special:
                    out += " "
                out += self.sp.decode(current) + token
                prev_is_special = True
                current = []
            else:
                current.append(token)
                prev_is_special = False
        out += self.sp.decode(current)
        out = self.clean_up_tokenization(out)
        out = " " + out  # _maybe_add_prefix_space: `tokens[0] not in no_prefix_space_tokens` is always true
        return out[1:]

    def decode(self, ids, skip_special_tokens=False, spaces_between_special_tokens=True):
        """transformers 4.37 PreTrainedTokenizer._decode (clean_up_tokenization_spaces is false in the config)."""
        tokens = [self.id_to_added[i] if i in self.id_to_added else self.sp.id_to_piece(i)
                  for i in ids if not (skip_special_tokens and i in self.all_special_ids)]
        legacy_added = ({t for t in self.added if t not in self.all_special_tokens}
                        | {t for t in self.additional_special_tokens if self.added[t] >= self.sp_size})
        sub_texts, current = [], []
        for token in tokens:
            if token in legacy_added:
                if current:
                    string = self.convert_tokens_to_string(current)
                    if string:
                        sub_texts.append(string)
                    current = []
                sub_texts.append(token)
            else:
                current.append(token)
        if current:
            sub_texts.append(self.convert_tokens_to_string(current))
        return (" " if spaces_between_special_tokens else "").join(sub_texts)


def internlm2_tokenizer_config(mirror):
    """tokenizer_config.json in the shape transformers 4.37 saved it for InternVL2-2B (slow tokenizer)."""
    def entry(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}
    decoder = {str(i): entry(t) for t, i in sorted(mirror.added.items(), key=lambda kv: kv[1])}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": mirror.additional_special_tokens,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>",
        "chat_template": INTERNLM2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 8192,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }


def write_internlm2_tokenizer_files(model_dir, model_bytes, mirror):
    """tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json: no tokenizer.json."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "tokenizer.model").write_bytes(model_bytes)
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(internlm2_tokenizer_config(mirror), indent=2, ensure_ascii=False) + "\n")
    (model_dir / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": mirror.additional_special_tokens, "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
    (model_dir / "added_tokens.json").write_text(json.dumps(
        {t: i for t, i in mirror.added.items() if i >= mirror.sp_size}, indent=2) + "\n")


def check_internlm2_mirror(model_bytes, mirror, texts):
    """Cross-check the mirror against transformers' own slow-tokenizer machinery (PythonBackend in 5.x, same
    tokenize() algorithm as 4.37) running a minimal InternLM2Tokenizer (same _tokenize / id mapping)."""
    import sentencepiece as spm
    from transformers import PreTrainedTokenizer
    from tokenizers import AddedToken as AT

    class MiniInternLM2Tokenizer(PreTrainedTokenizer):
        def __init__(self, **kwargs):
            self.sp_model = spm.SentencePieceProcessor(model_proto=model_bytes)
            super().__init__(**kwargs)

        @property
        def vocab_size(self):
            return self.sp_model.get_piece_size()

        def get_vocab(self):
            vocab = {self.convert_ids_to_tokens(i): i for i in range(self.vocab_size)}
            vocab.update(self.added_tokens_encoder)
            return vocab

        def _tokenize(self, text, **kwargs):
            return self.sp_model.encode(text, out_type=str)

        def _convert_token_to_id(self, token):
            return self.sp_model.piece_to_id(token)

        def _convert_id_to_token(self, index):
            return self.sp_model.IdToPiece(index)

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            return [self.sp_model.bos_id()] + token_ids_0 + (token_ids_1 or [])

    config = internlm2_tokenizer_config(mirror)
    tok = MiniInternLM2Tokenizer(
        added_tokens_decoder={int(k): AT(**v) for k, v in config["added_tokens_decoder"].items()},
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        additional_special_tokens=config["additional_special_tokens"],
    )
    for text in texts:
        theirs = tok(text, add_special_tokens=False)["input_ids"]
        ours = mirror.encode(text, add_special_tokens=False)
        assert theirs == ours, (text, theirs, ours)
        assert tok(text)["input_ids"] == mirror.encode(text), text
    return tok


INTERNLM2_TOKENIZER_CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "a  b   c    d",
    "line one\nline two\n\nline four\n",
    "\n\nstarts with newlines",
    "\tTab\tseparated",
    "Digits 0123456789 and 2024-05-17, 3.14159",
    "Le chat est sur le canapé. Der Hund läuft.",
    "图片里有什么？猫がソファの上に座っています。",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型",
    "emoji 🐉 needs byte fallback 🙂!",
    "mixed 中文 and English 123",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\n" + INTERNVL_SYSTEM_MESSAGE + "<|im_end|><|im_start|>user\n",
    "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is in this image?",
    "text before <|im_end|> text after",
    " <|im_end|>  two spaces after a special token",
    "<s>bos text</s>",
    "no<img>space</img>around",
    "<ref>a cat</ref><box>[[10, 20, 30, 40]]</box>",
    "<|im_start|><|im_end|>",
    "[UNUSED_TOKEN_145] is a placeholder piece",
    "",
]


def write_internlm2_tokenizer_reference(out_dir, model_bytes, mirror):
    """tests/fixtures/tokenizer/internlm2.json: pieces and ids for INTERNLM2_TOKENIZER_CASES, decodes, the chat
    prompt of InternVL's `model.chat()` and of the tokenizer_config chat_template."""
    tok = check_internlm2_mirror(model_bytes, mirror, INTERNLM2_TOKENIZER_CASES)
    cases = []
    for text in INTERNLM2_TOKENIZER_CASES:
        cases.append({"text": text, "pieces": mirror.tokenize(text),
                      "ids": mirror.encode(text, add_special_tokens=False),
                      "ids_with_bos": mirror.encode(text)})
    decode_ids = [mirror.encode(t, add_special_tokens=False) for t in INTERNLM2_TOKENIZER_CASES[:15]]
    decode_ids += [mirror.encode(t, add_special_tokens=False) for t in INTERNLM2_TOKENIZER_CASES[15:25]]
    im_end = mirror.added["<|im_end|>"]
    decode_ids += [[mirror.bos_id] + mirror.encode("Hello world", add_special_tokens=False) + [im_end],
                   mirror.encode("🐉", add_special_tokens=False)[:2]]  # an incomplete UTF-8 sequence
    decodes = [{"ids": ids, "text": mirror.decode(ids),
                "text_skip_special": mirror.decode(ids, skip_special_tokens=True)} for ids in decode_ids]

    # InternVL's model.chat(tokenizer, pixel_values, question, ...) with the `internlm2-chat` template.
    question = "What is in this image?"
    tiles = 2
    chat_query = ("<|im_start|>system\n" + INTERNVL_SYSTEM_MESSAGE + "<|im_end|>"
                  + "<|im_start|>user\n" + "<image>\n" + question + "<|im_end|>" + "<|im_start|>assistant\n")
    expanded = chat_query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>", 1)
    chat_ids = mirror.encode(expanded)
    # The same call on an InternVL2.5 checkpoint (template `internvl2_5`, same tokenizer).
    query_2_5 = ("<|im_start|>system\n" + INTERNVL2_5_SYSTEM_MESSAGE + "<|im_end|>\n"
                 + "<|im_start|>user\n" + "<image>\n" + question + "<|im_end|>\n" + "<|im_start|>assistant\n")
    expanded_2_5 = query_2_5.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>", 1)
    # The tokenizer_config chat_template (what `apply_chat_template` renders), same image expansion, tokenized
    # without adding BOS again (the template writes "<s>" as text, which the tokenizer splits out as id 1).
    messages = [{"role": "user", "content": "<image>\n" + question}]
    tok.chat_template = INTERNLM2_CHAT_TEMPLATE
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template_expanded = rendered.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>", 1)
    template_ids = mirror.encode(template_expanded, add_special_tokens=False)
    reference = {
        "tokenizer": "tests/fixtures/models/internvl2-internlm2 (tokenizer.model + tokenizer_config.json)",
        "sentencepiece_pieces": mirror.sp_size,
        "vocab_size_with_added_tokens": len(mirror),
        "special_ids": {t: i for t, i in sorted(mirror.added.items(), key=lambda kv: kv[1])},
        "encode_rule": "split on added tokens (longest match, no stripping), sentencepiece-encode each other "
                       "piece separately (add_dummy_prefix=false), BOS=1 prepended when add_special_tokens",
        "cases": cases,
        "decode_rule": "transformers 4.37 slow _decode + InternLM2Tokenizer.convert_tokens_to_string "
                       "(spaces_between_special_tokens=True, clean_up_tokenization_spaces=False)",
        "decodes": decodes,
        "chat": {
            "source": "InternVLChatModel.chat() with template 'internlm2-chat' (conversation.py, MPT separator style)",
            "system_message": INTERNVL_SYSTEM_MESSAGE,
            "question": question,
            "tiles": tiles,
            "tokens_per_tile": TOKENS_PER_TILE,
            "query": chat_query,
            "query_expanded": expanded,
            "input_ids": chat_ids,
            "eos_token_id": mirror.added["<|im_end|>"],
            "stop_token_ids_in_conversation_py": [mirror.eos_id, mirror.added["<|im_start|>"], im_end],
        },
        "chat_internvl2_5": {
            "source": "InternVLChatModel.chat() with template 'internvl2_5' (InternVL2.5 checkpoints), "
                      "separator '<|im_end|>\\n'",
            "system_message": INTERNVL2_5_SYSTEM_MESSAGE,
            "question": question,
            "tiles": tiles,
            "query": query_2_5,
            "query_expanded": expanded_2_5,
            "input_ids": mirror.encode(expanded_2_5),
            "eos_token_id": mirror.added["<|im_end|>"],
        },
        "chat_template": {
            "source": "tokenizer_config.json chat_template rendered with add_generation_prompt=True, no system message",
            "messages": messages,
            "rendered": rendered,
            "rendered_expanded": template_expanded,
            "input_ids": template_ids,
        },
    }
    tok_dir = out_dir / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "internlm2.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    print(f"  tokenizer internlm2: {mirror.sp_size} pieces + {len(INTERNVL_ADDED_TOKENS)} added, "
          f"chat prompt {len(chat_ids)} tokens")
    return chat_ids


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def vision_config(norm_type, qk_norm, qkv_bias):
    return dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        norm_type=norm_type, use_qk_norm=qk_norm, attention_bias=qkv_bias, layer_norm_eps=1e-6,
        image_size=[TILE, TILE], patch_size=[PATCH, PATCH], hidden_act="gelu",
    )


def text_config(model_type, vocab_size, tied, intermediate=128):
    return dict(
        model_type=model_type, vocab_size=vocab_size, hidden_size=64, intermediate_size=intermediate,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        max_position_embeddings=512, rope_theta=1000000.0 if model_type == "qwen2" else 10000.0,
        tie_word_embeddings=tied, hidden_act="silu",
    )


class BiasFreeWideProjector(torch.nn.Module):
    """NVLM-D's `mlp1`: LayerNorm(4C) -> Linear(4C -> FFN, no bias) -> GELU -> Linear(FFN -> H, no bias)."""

    def __init__(self, in_dim, wide, out_dim):
        super().__init__()
        self.layer_norm = torch.nn.LayerNorm(in_dim)
        self.linear_1 = torch.nn.Linear(in_dim, wide, bias=False)
        self.act = torch.nn.GELU()
        self.linear_2 = torch.nn.Linear(wide, out_dim, bias=False)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


def pixel_shuffle_v1(vision_features, scale_factor=0.5):
    """OpenGVLab's `pixel_shuffle` with ps_version 'v1': v2 without the final permute."""
    n, w, h, c = vision_features.size()
    x = vision_features.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))


def rerandomise(model, seed):
    """Give every parameter a random value with a scale that keeps activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 1 and ("norm" in name):
                value = 1.0 + 0.2 * noise if leaf == "weight" else 0.2 * noise
            elif leaf.startswith("lambda_"):
                value = 0.5 + 0.2 * noise
            elif p.dim() == 1:
                value = 0.2 * noise  # biases
            elif "embed_tokens" in name:
                # Small next to what the layers add, so a tied lm_head does not just echo the input.
                value = 0.05 * noise
            elif "lm_head" in name:
                value = noise
            elif leaf in ("cls_token", "position_embeddings"):
                value = 0.5 * noise
            else:  # Linear [out, in] and Conv2d [out, in, k, k]: unit-variance outputs
                value = noise / math.sqrt(p[0].numel())
            p.copy_(value)


def build_model(vocab_size, image_token_id, vision, text, wide_projector=False):
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    config._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(config)
    if wide_projector:
        c4 = vision["hidden_size"] * 4
        model.model.multi_modal_projector = BiasFreeWideProjector(c4, text["intermediate_size"], text["hidden_size"])
    model.eval()
    return model


def to_original_state_dict(state, vision_hidden):
    """transformers (hf) keys -> OpenGVLab keys, q/k/v fused into one `qkv` (the inverse of
    transformers' convert_internvl_weights_to_hf.py)."""
    out = {}
    pending_qkv = {}
    for key, value in state.items():
        k = key
        if k.startswith("model."):
            k = k[len("model."):]
        if k.startswith("lm_head."):
            k = "language_model." + k
        elif k.startswith("language_model."):
            k = "language_model.model." + k[len("language_model."):]
        elif k.startswith("multi_modal_projector."):
            k = (k.replace("multi_modal_projector.layer_norm", "mlp1.0")
                 .replace("multi_modal_projector.linear_1", "mlp1.1")
                 .replace("multi_modal_projector.linear_2", "mlp1.3"))
        elif k.startswith("vision_tower."):
            k = (k.replace("vision_tower.", "vision_model.")
                 .replace("encoder.layer.", "encoder.layers.")
                 .replace("embeddings.cls_token", "embeddings.class_embedding")
                 .replace("embeddings.position_embeddings", "embeddings.position_embedding")
                 .replace("embeddings.patch_embeddings.projection", "embeddings.patch_embedding")
                 .replace("lambda_1", "ls1").replace("lambda_2", "ls2")
                 .replace("attention.projection_layer", "attn.proj")
                 .replace("attention.q_norm", "attn.q_norm").replace("attention.k_norm", "attn.k_norm")
                 .replace("layernorm_before", "norm1").replace("layernorm_after", "norm2"))
            for proj in ("q_proj", "k_proj", "v_proj"):
                marker = f".attention.{proj}."
                if marker in k:
                    prefix, leaf = k.split(marker)
                    pending_qkv.setdefault((prefix, leaf), {})[proj] = value
                    k = None
                    break
        if k is not None:
            out[k] = value.contiguous()
    for (prefix, leaf), parts in pending_qkv.items():
        fused = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
        assert fused.shape[0] == 3 * vision_hidden
        out[f"{prefix}.attn.qkv.{leaf}"] = fused.contiguous()
    return out


def original_config(model, architecture, llm_architecture, llm_model_type, ps_version, select_layer):
    """An OpenGVLab-style config.json (transformers-4 spellings: `rope_theta`, `torch_dtype`)."""
    v = model.config.vision_config
    t = model.config.text_config
    vision = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size, "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads, "intermediate_size": v.intermediate_size,
        "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm, "norm_type": v.norm_type,
        "layer_norm_eps": v.layer_norm_eps, "image_size": v.image_size[0], "patch_size": v.patch_size[0],
        "num_channels": 3, "hidden_act": "gelu", "drop_path_rate": 0.0, "use_flash_attn": False,
        "initializer_factor": 1.0, "torch_dtype": "float32",
    }
    llm = {
        "architectures": [llm_architecture], "model_type": llm_model_type,
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_theta": t.rope_parameters["rope_theta"], "rope_scaling": None,
        "tie_word_embeddings": t.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": None, "eos_token_id": 2, "torch_dtype": "float32",
        "attention_bias": llm_architecture != "LlamaForCausalLM",
    }
    return {
        "architectures": [architecture], "model_type": "NVLM_D" if architecture == "NVLM_D" else "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "vision_config": vision, "llm_config": llm,
        "downsample_ratio": 0.5, "ps_version": ps_version, "select_layer": select_layer,
        "force_image_size": TILE, "dynamic_image_size": True, "use_thumbnail": True,
        "min_dynamic_patch": 1, "max_dynamic_patch": MAX_TILES, "template": "internvl2_5",
        "use_backbone_lora": 0, "use_llm_lora": 0, "torch_dtype": "float32",
    }


def interleave_internlm2_qkv(q, k, v, num_heads, num_kv_heads, head_dim):
    """InternLM2's fused `attention.wqkv` [(H + 2 KV) * D, C]: for each KV head g, its H/KV query heads, then key
    head g, then value head g (modeling_internlm2: rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=2+H/KV)).
    Inverse of transformers' convert_internvl_weights_to_hf.py."""
    groups = num_heads // num_kv_heads
    c = q.shape[1]
    q = q.reshape(num_kv_heads, groups, head_dim, c)
    k = k.reshape(num_kv_heads, 1, head_dim, c)
    v = v.reshape(num_kv_heads, 1, head_dim, c)
    return torch.cat([q, k, v], dim=1).reshape((num_heads + 2 * num_kv_heads) * head_dim, c).contiguous()


def to_internlm2_state_dict(state, vision_hidden, text):
    """transformers keys (Llama decoder) -> OpenGVLab InternVLChatModel keys with an InternLM2 decoder."""
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = text.head_dim
    vision_and_projector = {k: v for k, v in state.items() if not k.startswith(("model.language_model.", "lm_head."))}
    out = to_original_state_dict(vision_and_projector, vision_hidden)
    renames = [("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
               ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2"),
               ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm")]
    for key, value in state.items():
        if key == "lm_head.weight":
            out["language_model.output.weight"] = value.contiguous()
        elif key == "model.language_model.embed_tokens.weight":
            out["language_model.model.tok_embeddings.weight"] = value.contiguous()
        elif key == "model.language_model.norm.weight":
            out["language_model.model.norm.weight"] = value.contiguous()
        elif key.startswith("model.language_model.layers."):
            k = "language_model.model." + key[len("model.language_model."):]
            if ".self_attn.q_proj." in k:
                prefix = key.rsplit(".self_attn.q_proj.", 1)[0]
                leaf = key.rsplit(".", 1)[1]
                assert leaf == "weight", "InternLM2 fixtures are bias-free"
                fused = interleave_internlm2_qkv(state[f"{prefix}.self_attn.q_proj.weight"],
                                                 state[f"{prefix}.self_attn.k_proj.weight"],
                                                 state[f"{prefix}.self_attn.v_proj.weight"], heads, kv_heads, head_dim)
                out[k.replace("self_attn.q_proj", "attention.wqkv")] = fused
                continue
            if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
                continue
            for a, b in renames:
                k = k.replace(a, b)
            out[k] = value.contiguous()
    return out


@torch.no_grad()
def internlm2_text_logits(state, llm, input_ids):
    """An independent InternLM2 decoder forward written from OpenGVLab's modeling_internlm2.py (eager attention,
    no cache, plain RoPE below max_position_embeddings), reading the exported keys: checks the export."""
    heads, kv_heads = llm["num_attention_heads"], llm["num_key_value_heads"]
    hidden = llm["hidden_size"]
    head_dim = hidden // heads
    groups = heads // kv_heads
    eps = llm["rms_norm_eps"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        return torch.cat((-x[..., head_dim // 2:], x[..., :head_dim // 2]), dim=-1)

    prefix = "language_model.model."
    x = state[prefix + "tok_embeddings.weight"][input_ids]  # [1, T, C]
    t = x.shape[1]
    inv_freq = 1.0 / (llm["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(t).float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(llm["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        h = rms(x, state[p + "attention_norm.weight"])
        qkv = (h @ state[p + "attention.wqkv.weight"].T).view(1, t, kv_heads, groups + 2, head_dim)
        q = qkv[..., :groups, :].reshape(1, t, heads, head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim) + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(1, t, hidden)
        x = x + o @ state[p + "attention.wo.weight"].T
        h = rms(x, state[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ state[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ state[p + "feed_forward.w3.weight"].T)) @ state[p + "feed_forward.w2.weight"].T
    x = rms(x, state[prefix + "norm.weight"])
    return x @ state["language_model.output.weight"].T


def internlm2_original_config(model, mirror):
    """config.json like OpenGVLab/InternVL2-2B / InternVL2-8B (llm_config is an InternLM2Config,
    transformers-4.37 spellings: rope_theta, rope_scaling {"type", "factor"}, torch_dtype)."""
    config = original_config(model, "InternVLChatModel", "InternLM2ForCausalLM", "internlm2", "v2", -1)
    t = model.config.text_config
    rope = t.rope_parameters
    config["llm_config"] = {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": False,
        "bos_token_id": mirror.bos_id,
        "eos_token_id": mirror.eos_id,
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "model_type": "internlm2",
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "pad_token_id": mirror.eos_id,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_scaling": {"factor": rope["factor"], "type": rope["rope_type"]},
        "rope_theta": rope["rope_theta"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.37.2",
        "use_cache": True,
        "vocab_size": t.vocab_size,
    }
    config["template"] = "internlm2-chat"
    config["auto_map"] = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                          "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                          "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}
    return config


def save_internlm2_original(model, model_dir, model_bytes, mirror):
    model_dir.mkdir(parents=True, exist_ok=True)
    config = internlm2_original_config(model, mirror)
    state = to_internlm2_state_dict(model.state_dict(), model.config.vision_config.hidden_size,
                                    model.config.text_config)
    # The export must reproduce the transformers decoder it came from.
    ids = torch.tensor([mirror.encode("<|im_start|>user\nWhat is in this image?<|im_end|>")])
    expected = model.lm_head(model.model.language_model(input_ids=ids).last_hidden_state)
    got = internlm2_text_logits(state, config["llm_config"], ids)
    assert (expected - got).abs().max() < 1e-4, (expected - got).abs().max()
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_internlm2_tokenizer_files(model_dir, model_bytes, mirror)
    # generation_config.json: eos is <|im_end|> (transformers' converter notes that the InternLM2-based
    # checkpoints have "</s>" (2) in llm_config but "<|im_end|>" (92542) in generation_config).
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": mirror.added["<|im_end|>"], "transformers_version": "4.37.2"}, indent=2) + "\n")
    (model_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": TILE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD, "resample": 3, "size": TILE,
    }, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------

def example_inputs(tok, image_token, tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(tiles, 3, TILE, TILE, generator=gen)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    image = (ids("<img>") if image_token == "<IMG_CONTEXT>" else []) + \
        [tok.convert_tokens_to_ids(image_token)] * (TOKENS_PER_TILE * tiles) + \
        (ids("</img>") if image_token == "<IMG_CONTEXT>" else [])
    input_ids = ids("<|im_start|>user\n") + image + ids("\nWhat is in this image?<|im_end|>\n<|im_start|>assistant\n")
    return pixel_values, torch.tensor([input_ids])


def reset_dynamic_rope(model):
    """transformers' dynamic RoPE is stateful (`inv_freq` and `max_seq_len_cached` grow with the longest
    sequence seen and only reset once a sequence shorter than max_position_embeddings comes): put every rotary
    embedding back to its freshly-initialised state so each reference is what a fresh model computes."""
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "original_max_seq_len"):
            module.inv_freq = module.original_inv_freq.clone()
            module.max_seq_len_cached = module.original_max_seq_len


@torch.no_grad()
def reference(model, pixel_values, input_ids, select_layer):
    reset_dynamic_rope(model)
    vision_out = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
    hidden = vision_out.last_hidden_state if select_layer == -1 else vision_out.hidden_states[select_layer]
    image_features = model.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=select_layer, vision_feature_select_strategy="default"
    ).pooler_output
    logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    out = model.generate(
        input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=GREEDY_TOKENS, do_sample=False,
        output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
    )
    generated = out.sequences[0, input_ids.shape[1]:]
    margins = []
    for scores in out.scores:
        top = torch.topk(scores[0], 2).values
        margins.append(float(top[0] - top[1]))
    return {
        "pixel_values": pixel_values.contiguous(),
        "input_ids": input_ids.to(torch.int64).contiguous(),
        "vision_hidden_state": hidden.contiguous(),
        "image_features": image_features.contiguous(),
        "logits": logits.contiguous(),
        "greedy_tokens": generated.to(torch.int64).contiguous(),
    }, margins


@torch.no_grad()
def rope_trace(model, pixel_values, input_ids):
    """Re-run the greedy generation on a fresh rotary state and record, for every decoder forward, the
    positions it covered and the inv_freq / attention scaling the rotary embedding actually used."""
    reset_dynamic_rope(model)
    rotary = model.model.language_model.rotary_emb
    calls = []

    def hook(module, args, kwargs, output):
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        calls.append((position_ids[0].tolist(), module.inv_freq.detach().clone().float(),
                      float(module.attention_scaling)))

    handle = rotary.register_forward_hook(hook, with_kwargs=True)
    try:
        out = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=GREEDY_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    finally:
        handle.remove()
    reset_dynamic_rope(model)
    return calls, torch.cat([l.float() for l in out.logits], dim=0)  # [steps, vocab]


def write_reference(out_dir, name, tensors, margins, notes):
    ref_dir = out_dir / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ref_dir / f"{name}.safetensors"))
    if min(margins) < MIN_MARGIN:
        raise SystemExit(f"{name}: greedy margin {min(margins):.4f} below {MIN_MARGIN}: pick another seed")
    meta = {"greedy_margins": margins, "min_margin": min(margins), **notes,
            "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    (ref_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  {name}: min greedy margin {min(margins):.3f}, tokens {tensors['greedy_tokens'].tolist()}")


# ------------------------------------------------------------------------------------------------
# Checkpoint writers
# ------------------------------------------------------------------------------------------------

def write_common_files(model_dir, tok):
    tok.save_pretrained(model_dir)
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    gen = GenerationConfig(eos_token_id=eos, do_sample=False)
    gen.save_pretrained(model_dir)


def image_processor(size, max_patches):
    return GotOcr2ImageProcessor(
        size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=max_patches,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resample=3, do_convert_rgb=True,
    )


def hf_processor(tok, size=TILE, max_patches=MAX_TILES):
    return InternVLProcessor(
        image_processor=image_processor(size, max_patches), tokenizer=tok,
        video_processor=InternVLVideoProcessor(), image_seq_length=(size // PATCH // 2) ** 2,
        chat_template=CHAT_TEMPLATE,
    )


def save_hf(model, model_dir, tok, **kwargs):
    model.save_pretrained(model_dir, **kwargs)
    write_common_files(model_dir, tok)
    processor = hf_processor(tok)
    processor.save_pretrained(model_dir)
    # Hub checkpoints also ship the flat preprocessor_config.json.
    processor.image_processor.save_pretrained(model_dir)


def save_original(model, model_dir, tok, config):
    model_dir.mkdir(parents=True, exist_ok=True)
    state = to_original_state_dict(model.state_dict(), model.config.vision_config.hidden_size)
    if config["llm_config"]["tie_word_embeddings"]:
        state.pop("language_model.lm_head.weight", None)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_common_files(model_dir, tok)
    # OpenGVLab repositories keep the chat template inside tokenizer_config.json.
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = ORIGINAL_CHAT_TEMPLATE
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (model_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": TILE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD, "resample": 3, "size": TILE,
    }, indent=2) + "\n")


def rounded_to_bf16(model):
    """A copy whose parameters are rounded to bf16 but kept in f32, buffers (RoPE's inv_freq)
    untouched: what loading a bf16 checkpoint into an f32 runtime computes."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return rounded


# ------------------------------------------------------------------------------------------------
# Processor references: images, tiling, chat template and placeholder expansion
# ------------------------------------------------------------------------------------------------

def test_image(width, height, seed):
    """Gradients, stripes and a noisy patch: smooth enough to compress, sharp enough to test resizing."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    x = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    stripes = ((torch.arange(width).view(1, width) // 3 + torch.arange(height).view(height, 1) // 5) % 2).float()
    r = 255 * x
    g = 255 * y
    b = 200 * stripes + 40 * (x * y)
    rgb = torch.stack([r, g, b], dim=-1)
    ph, pw = max(1, height // 4), max(1, width // 4)
    rgb[:ph, :pw] = torch.randint(0, 256, (ph, pw, 3), generator=gen).float()
    return Image.fromarray(rgb.clamp(0, 255).round().to(torch.uint8).numpy(), "RGB")


def write_images(images_dir):
    """The test images, one file per format and colour mode."""
    images_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"square": (96, 96), "wide": (300, 100), "tall": (90, 250), "tiny": (1, 1), "large": (500, 375)}
    for i, (name, (w, h)) in enumerate(sizes.items()):
        test_image(w, h, SEED + 10 + i).save(images_dir / f"{name}.png")
    base = test_image(80, 80, SEED + 20)
    base.convert("L").save(images_dir / "gray.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(images_dir / "palette.png")
    rgba = base.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(base.size).point(lambda v: 0 if v < 40 else v)
    rgba.putalpha(alpha)
    rgba.save(images_dir / "alpha.png")
    base.save(images_dir / "photo.jpg", quality=95, subsampling=0)
    base.save(images_dir / "photo.webp", lossless=True)
    base.save(images_dir / "photo.bmp")
    frames = [base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), test_image(80, 80, SEED + 21).convert("P")]
    frames[0].save(images_dir / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    base.save(images_dir / "photo.png")
    # What PIL decodes each file to, for the decoder tests (GIF: first frame).
    decoded = {name.replace(".", "_"): torch.from_numpy(numpy.array(Image.open(images_dir / name).convert("RGB")))
               for name in ("photo.png", "photo.jpg", "photo.webp", "photo.bmp", "animated.gif", "gray.png",
                            "palette.png")}
    save_file(decoded, str(images_dir / "decoded-by-pil.safetensors"))


def original_rgb(image):
    """OpenGVLab's `image.convert('RGB')`: alpha is dropped, not composited."""
    return image.convert("RGB")


def dynamic_preprocess(image, tile, max_num, use_thumbnail, min_num=1):
    """InternVL's dynamic tiling (OpenGVLab `dynamic_preprocess`), resizing with PIL's bicubic filter."""
    w, h = image.size
    aspect = w / h
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff, area = (1, 1), float("inf"), w * h
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best_diff, best = diff, r
        elif diff == best_diff and area > 0.5 * tile * tile * r[0] * r[1]:
            best = r
    cols, rows = best
    resized = image.resize((tile * cols, tile * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop(((i % cols) * tile, (i // cols) * tile, (i % cols + 1) * tile, (i // cols + 1) * tile))
             for i in range(cols * rows)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((tile, tile), Image.Resampling.BICUBIC))
    return (cols, rows), tiles


def image_text(variant, tiles):
    """What one image becomes in an OpenGVLab-layout prompt."""
    if variant == "nvlm":
        tags = [f"<tile_{i}>" for i in range(1, tiles)] + ["<tile_global_thumbnail>"]
        return "<Image>" + "".join(tag + "<|vision_pad|>" * TOKENS_PER_TILE for tag in tags) + "</Image>"
    return "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>"


def original_reference(tok, messages, images_dir, variant):
    """OpenGVLab's `model.chat` prompt: images as `<image>\n` markers (numbered `Image-k: ` when a
    conversation has several), rendered with the checkpoint's template, then each marker expanded."""
    count = sum(part["type"] == "image" for m in messages for part in m["content"])
    rendered, grids, tiles_u8, per_image, k = [], [], [], [], 0
    for message in messages:
        text = ""
        for part in message["content"]:
            if part["type"] == "text":
                text += part["text"]
                continue
            k += 1
            text += (f"Image-{k}: " if count > 1 else "") + "<image>\n"
            image = original_rgb(Image.open(images_dir / part["path"]))
            grid, tiles = dynamic_preprocess(image, TILE, part.get("max_tiles", MAX_TILES), True)
            grids.append(grid)
            per_image.append(len(tiles))
            tiles_u8 += [torch.from_numpy(numpy.array(t)).permute(2, 0, 1) for t in tiles]
        rendered.append({"role": message["role"], "content": text})
    tok.chat_template = ORIGINAL_CHAT_TEMPLATE
    prompt = tok.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    for n in per_image:
        prompt = prompt.replace("<image>", image_text(variant, n), 1)
    input_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return input_ids, torch.stack(tiles_u8), grids, per_image, prompt


def hf_reference(tok, messages, images_dir):
    """transformers' own InternVLProcessor, through the checkpoint's chat template."""
    processor = hf_processor(tok)
    tok.chat_template = CHAT_TEMPLATE
    hf_messages, grids, per_image = [], [], []
    for message in messages:
        content = []
        for part in message["content"]:
            if part["type"] == "text":
                content.append({"type": "text", "text": part["text"]})
            else:
                # A PIL image, as harnesses pass them (a path would be decoded by torchvision instead).
                content.append({"type": "image", "image": Image.open(images_dir / part["path"])})
                w, h = Image.open(images_dir / part["path"]).size
                grids.append(get_optimal_tiled_canvas((h, w), (TILE, TILE), 1, MAX_TILES))
        hf_messages.append({"role": message["role"], "content": content})
    out = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    pixel_values = torch.as_tensor(out["pixel_values"])
    for grid in grids:
        per_image.append(grid[0] * grid[1] + (1 if grid[0] * grid[1] > 1 else 0))
    return out["input_ids"][0].tolist(), to_u8(pixel_values), grids, per_image, prompt


def to_u8(pixel_values):
    """Undo rescale + normalise; the values must come back as whole 0-255 levels."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    levels = (pixel_values * std + mean) * 255
    assert (levels - levels.round()).abs().max() < 1e-2, "pixel values are not whole levels"
    return levels.round().clamp(0, 255).to(torch.uint8)


PROCESSOR_CASES = [
    # (name, style, messages); style: "transformers" (InternVLProcessor), "internvl" or "nvlm" (OpenGVLab code)
    ("hf-square", "transformers", [("user", [("image", "square.png"), ("text", "What is in this image?")])]),
    ("hf-wide", "transformers", [("user", [("image", "wide.png"), ("text", "Describe it.")])]),
    ("hf-tall", "transformers", [("user", [("image", "tall.png"), ("text", "Describe it.")])]),
    ("hf-tiny", "transformers", [("user", [("image", "tiny.png"), ("text", "Color?")])]),
    ("hf-large", "transformers", [("user", [("image", "large.png"), ("text", "How many tiles?")])]),
    ("hf-gray", "transformers", [("user", [("image", "gray.png"), ("text", "Gray.")])]),
    ("hf-palette", "transformers", [("user", [("image", "palette.png"), ("text", "Palette.")])]),
    ("hf-alpha", "transformers", [("user", [("image", "alpha.png"), ("text", "Alpha.")])]),
    ("hf-two-images", "transformers", [
        ("system", [("text", "You are a careful assistant.")]),
        ("user", [("image", "wide.png"), ("text", "Compare with "), ("image", "tall.png"), ("text", "please.")]),
    ]),
    ("hf-multi-turn", "transformers", [
        ("user", [("image", "square.png"), ("text", "What is it?")]),
        ("assistant", [("text", "A picture.")]),
        ("user", [("text", "Which colours?")]),
    ]),
    ("internvl-large", "internvl", [("user", [("image", "large.png"), ("text", "Describe the image.")])]),
    ("internvl-alpha", "internvl", [("user", [("image", "alpha.png"), ("text", "Alpha.")])]),
    ("internvl-two-images", "internvl", [("user", [("image", "wide.png"), ("image", "tiny.png"),
                                                   ("text", "What differs?")])]),
    ("nvlm-wide", "nvlm", [("user", [("image", "wide.png"), ("text", "Describe the image.")])]),
    ("nvlm-tiny", "nvlm", [("user", [("image", "tiny.png"), ("text", "One tile.")])]),
    ("nvlm-two-images", "nvlm", [
        ("system", [("text", "Answer briefly.")]),
        ("user", [("image", "wide.png"), ("image", "tiny.png"), ("text", "Same scene?")]),
    ]),
]

# Tile grids at the real geometry (448-pixel tiles, up to 12 tiles), from transformers' own function.
GRID_SIZES = [(448, 448), (1, 1), (1000, 750), (1920, 1080), (1080, 1920), (5000, 100), (100, 5000),
              (1280, 1024), (500, 400), (896, 448), (800, 600), (4000, 3000), (640, 480), (2000, 500),
              (300, 900), (1234, 567), (448, 1344), (10, 2000)]


def write_processor_fixtures(out_dir, tok):
    images_dir = out_dir / "images"
    write_images(images_dir)
    proc_dir = out_dir / "processor"
    proc_dir.mkdir(parents=True, exist_ok=True)
    for rel in GROUP_FILES["processor"]:  # not processor/qwen-*, which the qwen_vl_processor group owns
        (out_dir / rel).unlink(missing_ok=True)
    index = []
    for name, style, spec in PROCESSOR_CASES:
        messages = [{"role": role, "content": [{"type": kind, ("text" if kind == "text" else "path"): value}
                                               for kind, value in parts]} for role, parts in spec]
        if style == "transformers":
            ids, pixels, grids, per_image, prompt = hf_reference(copy.deepcopy(tok), messages, images_dir)
        else:
            ids, pixels, grids, per_image, prompt = original_reference(copy.deepcopy(tok), messages, images_dir, style)
        save_file({
            "input_ids": torch.tensor(ids, dtype=torch.int64),
            "pixels_u8": pixels.contiguous(),
            "grids": torch.tensor(grids, dtype=torch.int64).reshape(-1, 2),
            "tiles_per_image": torch.tensor(per_image, dtype=torch.int64),
        }, str(proc_dir / f"{name}.safetensors"))
        index.append({"name": name, "style": style, "messages": messages, "prompt": prompt})
        print(f"  processor {name}: {len(ids)} tokens, grids {grids}, {pixels.shape[0]} tiles")
    (proc_dir / "cases.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")

    grids = [{"width": w, "height": h, "grid": list(get_optimal_tiled_canvas((h, w), (448, 448), 1, 12))}
             for w, h in GRID_SIZES]
    (proc_dir / "grids-448.json").write_text(json.dumps(grids, indent=1) + "\n")

    # Real geometry, subsampled: every 7th pixel of every 448-pixel tile.
    ip = image_processor(448, 12)
    out = ip(images=[Image.open(images_dir / "large.png")], return_tensors="pt")
    pixels = to_u8(out["pixel_values"])[:, :, 3::7, 3::7].contiguous()
    save_file({"pixels_u8_every_7th": pixels}, str(proc_dir / "large-448.safetensors"))
    print(f"  processor large-448: {pixels.shape[0]} tiles")



def seeded_model(build, first_seed, tiles, image_token, tok, select_layer, make_inputs=None, min_margin=MIN_MARGIN):
    """Try seeds from `first_seed` until greedy decoding is unambiguous (every top-1/top-2 gap at least
    MIN_MARGIN, in f32 and with the weights rounded to bf16) and varied (at least 4 distinct tokens).
    Deterministic: the same library versions pick the same seed. `make_inputs(seed)` overrides the prompt."""
    for seed in range(first_seed, first_seed + 50):
        model = build()
        rerandomise(model, seed)
        if make_inputs is None:
            pixel_values, input_ids = example_inputs(tok, image_token, tiles=tiles, seed=seed)
        else:
            pixel_values, input_ids = make_inputs(seed)
        tensors, margins = reference(model, pixel_values, input_ids, select_layer)
        rounded = rounded_to_bf16(model)
        _, bf16_margins = reference(rounded, pixel_values, input_ids, select_layer)
        if min(margins + bf16_margins) >= min_margin and len(set(tensors["greedy_tokens"].tolist())) >= 4:
            return model, pixel_values, input_ids, tensors, margins, seed
    raise SystemExit("no seed gave unambiguous greedy tokens")


# ------------------------------------------------------------------------------------------------
# Fixture groups (each writes its own files; `--only` picks some)
# ------------------------------------------------------------------------------------------------

def make_internvl3(out_dir, tok):
    models_dir = out_dir / "models"
    vocab = len(tok)
    img_ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    # --- InternVL3-style: one set of weights in three layouts ------------------------------------
    model, pixel_values, input_ids, tensors, margins, seed = seeded_model(
        lambda: build_model(vocab, img_ctx, vision_config("layer_norm", False, True),
                            text_config("qwen2", vocab, True)),
        SEED, tiles=2, image_token="<IMG_CONTEXT>", tok=tok, select_layer=-1)
    notes = {"seed": seed, "tiles": 2, "select_layer": -1, "ps_version": "v2",
             "checkpoints": ["internvl3-hf", "internvl3-original", "internvl3-hf-sharded"]}
    write_reference(out_dir, "internvl3", tensors, margins, notes)
    save_hf(model, models_dir / "internvl3-hf", tok)
    save_hf(model, models_dir / "internvl3-hf-sharded", tok, max_shard_size="250KB")
    save_original(model, models_dir / "internvl3-original", tok,
                  original_config(model, "InternVLChatModel", "Qwen2ForCausalLM", "qwen2", "v2", -1))

    # --- the same weights rounded to bf16 and saved as bf16 ---------------------------------------
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.save_pretrained(models_dir / "internvl3-hf-bf16")
    write_common_files(models_dir / "internvl3-hf-bf16", tok)
    tensors, margins = reference(rounded_to_bf16(model), pixel_values, input_ids, -1)
    write_reference(out_dir, "internvl3-bf16", tensors, margins,
                    {**notes, "weights": "bfloat16, computed in float32", "checkpoints": ["internvl3-hf-bf16"]})


def make_internvl2_llama_untied(out_dir, tok):
    vocab = len(tok)
    img_ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")

    # --- InternVL2-style: Llama decoder, untied, pixel shuffle v1, second-to-last ViT layer --------
    def build_internvl2():
        m = build_model(vocab, img_ctx, vision_config("layer_norm", False, True), text_config("llama", vocab, False))
        m.model.pixel_shuffle = pixel_shuffle_v1
        m.config.vision_feature_layer = -2
        return m
    model, _, _, tensors, margins, seed = seeded_model(
        build_internvl2, SEED + 100, tiles=1, image_token="<IMG_CONTEXT>", tok=tok, select_layer=-2)
    write_reference(out_dir, "internvl2-llama-untied", tensors, margins,
                    {"seed": seed, "tiles": 1, "select_layer": -2, "ps_version": "v1",
                     "checkpoints": ["internvl2-llama-untied"]})
    save_original(model, out_dir / "models" / "internvl2-llama-untied", tok,
                  original_config(model, "InternVLChatModel", "LlamaForCausalLM", "llama", "v1", -2))


def make_nvlm_d(out_dir, tok):
    vocab = len(tok)
    vision_pad = tok.convert_tokens_to_ids("<|vision_pad|>")
    # --- NVLM-D-style ------------------------------------------------------------------------------
    model, _, _, tensors, margins, seed = seeded_model(
        lambda: build_model(vocab, vision_pad, vision_config("rms_norm", True, False),
                            text_config("qwen2", vocab, False, intermediate=176), wide_projector=True),
        SEED + 200, tiles=3, image_token="<|vision_pad|>", tok=tok, select_layer=-1)
    write_reference(out_dir, "nvlm-d", tensors, margins,
                    {"seed": seed, "tiles": 3, "select_layer": -1, "ps_version": "v2", "checkpoints": ["nvlm-d"]})
    # NVLM-D-72B's llm_config names a Qwen2 architecture with a llama model_type.
    save_original(model, out_dir / "models" / "nvlm-d", tok,
                  original_config(model, "NVLM_D", "Qwen2ForCausalLM", "llama", "v2", -1))


def make_internvl2_internlm2(out_dir, tok):
    """InternVL2-2B-style: InternLM2 decoder (GQA 8 query / 2 KV heads, head_dim 8, interleaved wqkv, bias-free,
    untied `output`), InternLM2 SentencePiece tokenizer, `internlm2-chat` prompt with BOS."""
    model_bytes = build_internlm2_sentencepiece()
    mirror = InternLM2TokenizerMirror(model_bytes)
    chat_ids = write_internlm2_tokenizer_reference(out_dir, model_bytes, mirror)
    vocab = len(mirror)
    img_ctx = mirror.added["<IMG_CONTEXT>"]
    tiles = 2
    text = dict(
        model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0},
        tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=mirror.bos_id, eos_token_id=mirror.eos_id, pad_token_id=mirror.eos_id,
    )

    def make_inputs(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(tiles, 3, TILE, TILE, generator=gen), torch.tensor([chat_ids])

    model, _, _, tensors, margins, seed = seeded_model(
        lambda: build_model(vocab, img_ctx, vision_config("layer_norm", False, True), text),
        SEED + 300, tiles=tiles, image_token="<IMG_CONTEXT>", tok=None, select_layer=-1, make_inputs=make_inputs,
        min_margin=NEW_MIN_MARGIN)
    _, step_logits = rope_trace(model, tensors["pixel_values"], tensors["input_ids"])
    assert torch.equal(step_logits.argmax(-1), tensors["greedy_tokens"])
    tensors["greedy_step_logits"] = step_logits.contiguous()
    write_reference(out_dir, "internvl2-internlm2", tensors, margins,
                    {"seed": seed, "tiles": tiles, "select_layer": -1, "ps_version": "v2",
                     "prompt": "tests/fixtures/tokenizer/internlm2.json chat.input_ids (model.chat() prompt, BOS)",
                     "greedy_text": mirror.decode(tensors["greedy_tokens"].tolist()),
                     "checkpoints": ["internvl2-internlm2"]})
    save_internlm2_original(model, out_dir / "models" / "internvl2-internlm2", model_bytes, mirror)


# RoPE-scaling fixtures: transformers layout (like internvl3-hf), untied Llama decoder with head_dim 16.
ROPE_FIXTURES = {
    "internvl-rope-linear": dict(
        seed=SEED + 400, tiles=1, max_position_embeddings=512,
        rope={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    # max_position_embeddings 32 and a one-tile prompt of 36 tokens: inv_freq is recomputed at every forward.
    "internvl-rope-dynamic": dict(
        seed=SEED + 500, tiles=1, max_position_embeddings=32,
        rope={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    # head_dim 16, theta 1e4: wavelengths 6.3, 19.9, 62.8, 199, 628, 1987, 6283, 19869; with original 256 and
    # low/high factors 1/8 the bands are high (< 32): 2, medium (32..256): 2, low (> 256): 4.
    "internvl-rope-llama3": dict(
        seed=SEED + 600, tiles=1, max_position_embeddings=1024,
        rope={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
              "original_max_position_embeddings": 256, "rope_theta": 10000.0}),
    # Qwen2.5-style yarn entry (factor + original_max_position_embeddings, defaults for the rest).
    "internvl-rope-yarn": dict(
        seed=SEED + 700, tiles=1, max_position_embeddings=512,
        rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}),
}


def make_rope_fixture(out_dir, tok, name):
    spec = ROPE_FIXTURES[name]
    vocab = len(tok)
    img_ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    text = dict(
        model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        max_position_embeddings=spec["max_position_embeddings"], rope_parameters=dict(spec["rope"]),
        tie_word_embeddings=False, hidden_act="silu",
    )
    model, pixel_values, input_ids, tensors, margins, seed = seeded_model(
        lambda: build_model(vocab, img_ctx, vision_config("layer_norm", False, True), dict(text)),
        spec["seed"], tiles=spec["tiles"], image_token="<IMG_CONTEXT>", tok=tok, select_layer=-1,
        min_margin=NEW_MIN_MARGIN)
    calls, step_logits = rope_trace(model, pixel_values, input_ids)
    # calls[0] is the prompt (prefill) forward, calls[1:] one decode step each.
    assert len(calls) == GREEDY_TOKENS and len(calls[0][0]) == input_ids.shape[1]
    assert torch.equal(step_logits.argmax(-1), tensors["greedy_tokens"])
    tensors["greedy_step_logits"] = step_logits.contiguous()                             # [steps, vocab]
    tensors["rope_inv_freq"] = torch.stack([c[1] for c in calls]).contiguous()           # [steps, head_dim/2]
    tensors["rope_seq_len"] = torch.tensor([max(c[0]) + 1 for c in calls], dtype=torch.int64)
    tensors["rope_attention_scaling"] = torch.tensor([c[2] for c in calls], dtype=torch.float32)
    rotary = model.model.language_model.rotary_emb
    notes = {
        "seed": seed, "tiles": spec["tiles"], "select_layer": -1, "ps_version": "v2", "checkpoints": [name],
        "rope_parameters": model.config.text_config.rope_parameters,
        "max_position_embeddings": model.config.text_config.max_position_embeddings,
        "prompt_tokens": int(input_ids.shape[1]),
        "attention_scaling": float(rotary.attention_scaling),
        "inv_freq_at_init": rotary.original_inv_freq.tolist(),
        "forwards": [{"positions": [c[0][0], c[0][-1]], "seq_len": max(c[0]) + 1, "inv_freq": c[1].tolist(),
                      "attention_scaling": c[2]} for c in calls],
    }
    write_reference(out_dir, name, tensors, margins, notes)
    save_hf(model, out_dir / "models" / name, tok)


# Groups written by fixtures_qwen_vl.py, and the files each owns.
QWEN_VL_GROUP_FILES = {
    "qwen_vl_processor": ["processor/qwen-cases.json", "processor/qwen-smart-resize.json"]
                         + [f"processor/qwen-{name.removeprefix('qwen-')}.safetensors" for name in (
                             "qwen-tiny-10x10", "qwen-tall-30x200", "qwen-wide-300x41", "qwen-big-320x240",
                             "qwen-half-98x70", "qwen-half-112x80", "alpha")],
    "qwen2_5_vl": ["models/qwen2_5-vl", "models/qwen2_5-vl-hf5", "models/qwen2_5-vl-tied",
                   "reference/qwen2_5-vl.safetensors", "reference/qwen2_5-vl.json",
                   "reference/qwen2_5-vl-tied.safetensors", "reference/qwen2_5-vl-tied.json"],
    "qwen3_vl": ["models/qwen3-vl", "reference/qwen3-vl.safetensors", "reference/qwen3-vl.json"],
}
# Groups written by fixtures_llava.py, and the files each owns.
LLAVA_GROUP_FILES = {
    "pixtral": ["models/pixtral", "models/pixtral-hf5", "reference/pixtral.safetensors", "reference/pixtral.json"],
    # reads models/pixtral: run after (or with) the pixtral group
    "pixtral_sliding": ["reference/pixtral-sliding.safetensors", "reference/pixtral-sliding.json"],
    "llava": ["models/llava", "models/llava-nobias", "reference/llava.safetensors", "reference/llava.json",
              "reference/llava-nobias.safetensors", "reference/llava-nobias.json"],
    "llava_processor": ["processor/llava-cases.json"]
                       + [f"processor/{name}.safetensors" for name in (
                           "pixtral-tiny-1x1", "pixtral-17x17", "pixtral-200x101", "pixtral-wide-300x41",
                           "pixtral-tall-30x200", "pixtral-129x129", "pixtral-128x48", "pixtral-alpha-40x30",
                           "llava-tiny-10x10", "llava-wide-300x41", "llava-tall-30x200", "llava-87x84",
                           "llava-100x57", "llava-alpha-40x30")],
}
# Groups written by fixtures_nemotron.py, and the files each owns (nemotron_omni also rewrites images/nemotron-*.png in
# place).
NEMOTRON_GROUP_FILES = {
    "nemotron_h": ["models/nemotron-h", "models/nemotron-h-hub", "reference/nemotron-h.safetensors",
                   "reference/nemotron-h.json"],
    "nemotron_omni": ["models/nemotron-omni", "reference/nemotron-omni.safetensors", "reference/nemotron-omni.json"],
}
GROUPS = (["internvl3", "internvl2-llama-untied", "nvlm-d", "processor", "internvl2-internlm2"] + list(ROPE_FIXTURES)
          + list(QWEN_VL_GROUP_FILES) + list(LLAVA_GROUP_FILES) + list(NEMOTRON_GROUP_FILES))
# Files each group owns under tests/fixtures (what `--only` deletes before rewriting).
GROUP_FILES = {
    "internvl3": ["models/internvl3-hf", "models/internvl3-hf-sharded", "models/internvl3-original",
                  "models/internvl3-hf-bf16", "reference/internvl3.safetensors", "reference/internvl3.json",
                  "reference/internvl3-bf16.safetensors", "reference/internvl3-bf16.json"],
    "internvl2-llama-untied": ["models/internvl2-llama-untied", "reference/internvl2-llama-untied.safetensors",
                               "reference/internvl2-llama-untied.json"],
    "nvlm-d": ["models/nvlm-d", "reference/nvlm-d.safetensors", "reference/nvlm-d.json"],
    # images/ is rewritten in place
    "processor": ["processor/cases.json", "processor/grids-448.json", "processor/large-448.safetensors"]
                 + [f"processor/{name}.safetensors" for name, _, _ in PROCESSOR_CASES],
    "internvl2-internlm2": ["models/internvl2-internlm2", "reference/internvl2-internlm2.safetensors",
                            "reference/internvl2-internlm2.json", "tokenizer/internlm2.json"],
    **{name: [f"models/{name}", f"reference/{name}.safetensors", f"reference/{name}.json"] for name in ROPE_FIXTURES},
    **QWEN_VL_GROUP_FILES,
    **LLAVA_GROUP_FILES,
    **NEMOTRON_GROUP_FILES,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
    parser.add_argument("--only", default=None,
                        help="comma-separated fixture groups to (re)write, leaving everything else untouched: "
                             + ", ".join(GROUPS))
    args = parser.parse_args()
    out_dir = Path(args.out)
    if args.only is None:
        groups = GROUPS
        shutil.rmtree(out_dir / "models", ignore_errors=True)
        shutil.rmtree(out_dir / "reference", ignore_errors=True)
        shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
    else:
        groups = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise SystemExit(f"unknown fixture group(s) {unknown}; known: {GROUPS}")
        for group in groups:
            for rel in GROUP_FILES[group]:
                path = out_dir / rel
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)

    tok = build_tokenizer()
    print(f"tokenizer: {len(tok)} tokens, <IMG_CONTEXT> = {tok.convert_tokens_to_ids('<IMG_CONTEXT>')}, "
          f"<|vision_pad|> = {tok.convert_tokens_to_ids('<|vision_pad|>')}")

    for group in groups:
        if group == "internvl3":
            make_internvl3(out_dir, tok)
        elif group == "internvl2-llama-untied":
            make_internvl2_llama_untied(out_dir, tok)
        elif group == "nvlm-d":
            make_nvlm_d(out_dir, tok)
        elif group == "processor":
            write_processor_fixtures(out_dir, tok)
        elif group == "internvl2-internlm2":
            make_internvl2_internlm2(out_dir, tok)
        elif group in QWEN_VL_GROUP_FILES:
            import fixtures_qwen_vl  # imports this module back for the tokenizer corpus, rerandomise, test_image
            fixtures_qwen_vl.make_group(group, out_dir)
        elif group in LLAVA_GROUP_FILES:
            import fixtures_llava  # imports this module back for the BPE, rerandomise, test_image
            fixtures_llava.make_group(group, out_dir)
        elif group in NEMOTRON_GROUP_FILES:
            import fixtures_nemotron  # imports this module (and fixtures_llava) back for the BPE, rerandomise, images
            fixtures_nemotron.make_group(group, out_dir)
        else:
            make_rope_fixture(out_dir, tok, group)

    total = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    print(f"wrote {out_dir} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
