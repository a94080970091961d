"""LLaVA-architecture parity fixtures (Pixtral-12B and LLaVA-1.5 style), written by `make_fixtures.py --only GROUP`
(this module is not a script of its own; make_fixtures.py imports it when one of its groups runs).

    python3 scripts/make_fixtures.py --only pixtral,llava,llava_processor      # ~10 s on 2 cores, ~4.6 MB

Groups: pixtral, llava, llava_processor. Each rewrites only its own files (make_fixtures.GROUP_FILES) and (re)writes
its input images (deterministic: same bytes every run). Everything is computed in float32 with transformers itself
(eager attention); the processors are transformers' own (torchvision backend), loaded back with `AutoProcessor` from
the checkpoint's files; every checkpoint is reloaded with `from_pretrained` and checked to reproduce the reference
inputs and logits. The spec these follow: /work/notes/pixtral-llava-spec.md (not in the repository).

Tokenizers
    pixtral  a tekken-style byte-level BPE (tokenizer.json only, like mistral-community/pixtral-12b): 32 control tokens
             at ids 0..31 with the real ids of the named ones (<unk> 0, <s> 1, </s> 2, [INST] 3, [/INST] 4, ...,
             [IMG] 10, <pad> 11, [IMG_BREAK] 12, [IMG_END] 13, ..., [SYSTEM_PROMPT] 17, [/SYSTEM_PROMPT] 18,
             [TOOL_CONTENT] 19, <SPECIAL_20> .. <SPECIAL_31>), then the 400-piece BPE of the other fixtures at 32..431.
             Pre-tokenizer Split(tekken regex, isolated) + ByteLevel(use_regex=false), BPE ignore_merges=true,
             post-processor ByteLevel: the tokenizer adds NO BOS; the chat template writes "<s>" as text (as the real
             pixtral-12b does). tokenizer_config.json tokenizer_class "PreTrainedTokenizerFast".
    llava    a Llama-style BPE with byte fallback (what transformers' LlamaTokenizer builds: Metaspace "first", no
             normalizer, BPE byte_fallback + fuse_unk): <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258, pieces, then
             <image> and <pad> appended (as llava-hf/llava-1.5-7b-hf: <image> 32000, <pad> 32001); the post-processor
             (TemplateProcessing) adds BOS; the chat template does not. Config vocab_size is padded up to a multiple of
             64 (as 32064 for 32002 tokens); the padding rows of embed_tokens / lm_head are scaled by 0.1.

Models (tests/fixtures/models/; every parameter re-randomised, see `rerandomise_llava`)
    pixtral       LlavaForConditionalGeneration = PixtralVisionModel (hidden 32, 3 layers, 2 heads of 16, MLP 64, silu,
                  patch 16, image_size 128, rope theta 1e4) + projector (32 -> 64 -> 64, gelu, biases) +
                  MistralForCausalLM (hidden 64, 4 heads x head_dim 24 = 96 != 64, 2 KV heads, MLP 96, 2 layers,
                  rope theta 1e9, rms eps 1e-5, sliding_window null, untied); vision_feature_layer -1, strategy "full".
                  transformers-4 layout as mistral-community/pixtral-12b ships it: `language_model.model.*`,
                  `language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`; config.json in the
                  4.45 spellings (rope_theta, torch_dtype, is_composition, image_seq_length 1, NO
                  multimodal_projector_bias key = default true). preprocessor_config.json (PixtralImageProcessor,
                  longest_edge 128, patch 16), processor_config.json, chat_template.json, generation_config.json.
    pixtral-hf5   the same weights saved by transformers 5 with save_original_format=False (`model.language_model.*`,
                  `model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.weight`), its config spellings
                  (rope_parameters, dtype, vision rope_parameters {"rope_type": "axial"}), processor files as
                  processor.save_pretrained writes them (+ the flat preprocessor_config.json).
    llava         LLaVA-1.5 style: CLIPVisionModel (hidden 32, 3 layers, 2 heads, MLP 64, quick_gelu by default, image
                  84, patch 14 -> 36 patches + CLS) + projector with biases + LlamaForCausalLM (hidden 64, 4 heads, 4
                  KV heads, MLP 96, 2 layers, rope theta default 1e4, untied); vision_feature_layer -2, strategy
                  "default" (36 image tokens). Hub layout of llava-hf/llava-1.5-7b-hf: `language_model.model.*`,
                  `language_model.lm_head.weight`, `vision_tower.vision_model.*` (transformers 5.24 itself would write
                  `vision_tower.*` without `vision_model.`; it loads both), `multi_modal_projector.*`; 4.36-style
                  config (partial text_config / vision_config relying on defaults). CLIPImageProcessor shortest_edge
                  84 + center crop 84; processor_config.json patch_size 14, num_additional_image_tokens 1.
    llava-nobias  another seed; multimodal_projector_bias false, strategy "full" (CLS kept: 37 image tokens), and
                  vision_feature_layer [-3, -1] (a list: the two layers' features are concatenated, projector in 64).

References (tests/fixtures/reference/<name>.safetensors + .json; tensor names "<case>.<tensor>")
    pixtral (weights of pixtral and pixtral-hf5), llava, llava-nobias. Cases:
      pixtral.single      pixtral-200x120.png (longest edge 200 > 128: 120x200 -> 76x128 -> 80x128, 5 rows x 8 cols)
      pixtral.two_images  system message (string) + pixtral-60x100.png (no resize, 100x60 -> 112x64: 7 x 4) and
                          pixtral-130x50.png (130 > 128: 50x130 -> 49x128 -> 64x128: 4 x 8) in one user message
      llava.single        llava-120x80.png (shortest edge 80 -> 84: 84x126, centre crop left 21)
      llava.batch         two rows, left-padded: llava-60x100.png + "Color?" and llava-90x90.png + a longer question
    Per case: input_ids, attention_mask [B, L]; pixel_values_u8 (see below); image_sizes [N, 2] (Pixtral);
    vision_hidden_states [layers+1, ...] (index 0 = input of block 0: ln_pre output (Pixtral) / pre_layrnorm output
    (CLIP)); Pixtral: vision_position_ids [P, 2] (row, col per patch), vision_rope_cos / vision_rope_sin [P, head_dim];
    vision_selected (what enters the projector) and image_features (projector output); position_ids [B, L] (what
    generate feeds: cumsum(attention_mask) - 1, 0 at padding); logits [B, L, V] (single) or last_logits [B, V];
    greedy_tokens [B, 8] (generate, do_sample=False, eos_token_id=None); greedy_step_logits [B, 8, V] (KV cache).
    pixel_values_u8: uint8 levels with model input = (f32(u8) - f32(f32(mean)*255)) / f32(f32(std)*255) bit-exactly;
    Pixtral's batch is [N, 3, maxH, maxW]: each image top-left, the padding (u8 0 here) is 0.0 in the model input,
    and only the image_sizes[i] region is read by the model.

Processor references (tests/fixtures/processor/pixtral-*.safetensors, llava-*.safetensors, llava-cases.json):
    odd sizes through both processors (tiny upscales, floor-vs-round of the longest-edge rule, wide / tall, odd crop
    offsets, RGBA composited on white), each with pixel levels, sizes and input_ids of a fixed prompt; plus chat
    template renders (system message, multi-turn) and their ids.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoProcessor,
    GenerationConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedTokenizerFast,
)

import make_fixtures as mf

GREEDY_TOKENS = mf.GREEDY_TOKENS
SLIDING_WINDOWS = (16, 24, 20, 28, 32, 40)
MIN_MARGIN = mf.NEW_MIN_MARGIN  # 0.05, in f32 and with the weights rounded to bf16, at every greedy step
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# ------------------------------------------------------------------------------------------------
# Tokenizers and chat templates
# ------------------------------------------------------------------------------------------------

# mistral_common's control tokens of the tekken tokenizers, in id order (pixtral-12b: [IMG] 10, [IMG_BREAK] 12,
# [IMG_END] 13); the real one has 1000 (<SPECIAL_20> .. <SPECIAL_999> unused), here 32.
PIXTRAL_NAMED_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]
PIXTRAL_NUM_SPECIALS = 32
PIXTRAL_SPECIALS = PIXTRAL_NAMED_SPECIALS + [f"<SPECIAL_{i}>" for i in range(len(PIXTRAL_NAMED_SPECIALS),
                                                                            PIXTRAL_NUM_SPECIALS)]
# The pre-tokenizer regex of tekken.json (Mistral NeMo / Pixtral): single digits, case-aware words.
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# mistral-community/pixtral-12b chat_template.json (the original HF conversion; vLLM's examples/template_pixtral_hf.jinja
# is a corrected copy). Text chunks are read from chunk["content"] (NOT chunk["text"]), BOS is written as text, the
# system message goes into the LAST user turn followed by "\n\n", there is no generation-prompt branch.
PIXTRAL_CHAT_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\\n\\n" }}
        {%- else %}
            {{- "[INST]" }}
        {%- endif %}
        {%- if message["content"] is not string %}
            {%- for chunk in message["content"] %}
                {%- if chunk["type"] == "text" %}
                    {{- chunk["content"] }}
                {%- elif chunk["type"] == "image" %}
                    {{- "[IMG]" }}
                {%- else %}
                    {{- raise_exception("Unrecognized content type!") }}
                {%- endif %}
            {%- endfor %}
        {%- else %}
            {{- message["content"] }}
        {%- endif %}
        {{- "[/INST]" }}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}"""

# llava-hf/llava-1.5-7b-hf chat_template.json: images first ("<image>\n" each), then texts each followed by a space.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Extra training text for the Llama-style tokenizer (the real vocabulary has these words as pieces).
LLAVA_CORPUS_EXTRA = """
USER: What is shown in this image? ASSISTANT: A cat. USER: Describe the picture. ASSISTANT: The image shows a street.
Color? Which colours are in the picture? Compare the two images. Answer briefly.
"""


def build_pixtral_tokenizer():
    """Tekken-style tokenizer as transformers' Mistral converter builds it (see the module docstring)."""
    vocab, merges = mf.train_bpe()
    full = {token: i for i, token in enumerate(PIXTRAL_SPECIALS)}
    full.update({token: i + PIXTRAL_NUM_SPECIALS for token, i in vocab.items()})
    backend = Tokenizer(models.BPE(full, merges, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PIXTRAL_SPECIALS])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for i, t in enumerate(PIXTRAL_SPECIALS):
        assert tok.convert_tokens_to_ids(t) == i, t
    assert len(tok) == PIXTRAL_NUM_SPECIALS + len(vocab)
    return tok


def pixtral_tokenizer_config():
    """tokenizer_config.json in the shape transformers 4.45 saved it for a PreTrainedTokenizerFast (the pixtral-12b
    conversion): no add_bos_token, no chat template (that is in chat_template.json)."""
    def entry(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}
    return {
        "added_tokens_decoder": {str(i): entry(t) for i, t in enumerate(PIXTRAL_SPECIALS)},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "processor_class": "PixtralProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def train_llama_bpe():
    """A byte-fallback BPE over Metaspace words (pieces like "▁the"): (vocab, merges) with <unk> <s> </s> and the 256
    byte pieces first, as in Llama's SentencePiece vocabulary."""
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=specials, show_progress=False, limit_alphabet=100)
    bpe.train_from_iterator([mf.CORPUS + LLAVA_CORPUS_EXTRA] * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def build_llava_tokenizer():
    vocab, merges = train_llama_bpe()
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True, add_eos_token=False)
    base = len(tok)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False),
                    AddedToken("<pad>", special=True, normalized=False)])
    tok.pad_token = "<pad>"
    tok.model_max_length = 4096
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"]) == [0, 1, 2, base, base + 1]
    return tok


def llava_tokenizer_config(tok):
    """tokenizer_config.json in the shape of llava-hf/llava-1.5-7b-hf's (LlamaTokenizer, add_bos_token, legacy false,
    left padding)."""
    def entry(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}
    added = {str(i): entry(t) for t, i in [("<unk>", 0), ("<s>", 1), ("</s>", 2)]}
    for t in ("<image>", "<pad>"):
        added[str(tok.convert_tokens_to_ids(t))] = entry(t)
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


# ------------------------------------------------------------------------------------------------
# Input images
# ------------------------------------------------------------------------------------------------

# name -> (width, height); every file is tests/fixtures/images/<name>.png (RGB unless named "alpha")
PIXTRAL_IMAGES = {
    "pixtral-200x120": (200, 120),  # single: ratio 1.5625 -> 76x128 -> 80x128 (5 x 8 patches)
    "pixtral-60x100": (60, 100),    # two_images: no resize -> 112x64 (7 x 4)
    "pixtral-130x50": (130, 50),    # two_images: ratio 1.015625 -> 49x128 -> 64x128 (4 x 8)
    # processor-only
    "pixtral-tiny-1x1": (1, 1),     # -> 16x16 (1 x 1)
    "pixtral-17x17": (17, 17),      # -> 32x32 (stretched up, 2 x 2)
    "pixtral-200x101": (200, 101),  # 101 / 1.5625 = 64.64: floor 64 -> 64 (4 rows); round() would give 65 -> 80
    "pixtral-wide-300x41": (300, 41),
    "pixtral-tall-30x200": (30, 200),
    "pixtral-129x129": (129, 129),  # just over: -> 128x128
    "pixtral-128x48": (128, 48),    # exactly the longest edge: no resize, 48x128 (3 x 8)
}
LLAVA_IMAGES = {
    "llava-120x80": (120, 80),      # single: 80 -> 84, 120 -> int(84*120/80) = 126, crop left 21
    "llava-60x100": (60, 100),      # batch row 0: 60 -> 84, 100 -> 140, crop top 28
    "llava-90x90": (90, 90),        # batch row 1: square downscale 90 -> 84, no crop
    # processor-only
    "llava-tiny-10x10": (10, 10),   # upscaled to 84x84
    "llava-wide-300x41": (300, 41),  # 41 -> 84, 300 -> int(84*300/41) = 614, crop left 265
    "llava-tall-30x200": (30, 200),
    "llava-87x84": (87, 84),        # no resize of the short side, crop left int(3/2) = 1
    "llava-100x57": (100, 57),      # 84*100/57 = 147.37 -> 147 (truncated), crop left 31
}
ALPHA_IMAGES = {"pixtral-alpha-40x30": (40, 30), "llava-alpha-40x30": (40, 30)}


def alpha_image(width, height, seed):
    """RGBA with a horizontal alpha ramp (0 on the left third), like make_fixtures' alpha.png."""
    base = mf.test_image(width, height, seed).convert("RGBA")
    alpha = Image.linear_gradient("L").rotate(90).resize((width, height)).point(lambda v: 0 if v < 80 else v)
    base.putalpha(alpha)
    return base


def write_images(images_dir, which):
    images_dir.mkdir(parents=True, exist_ok=True)
    table = PIXTRAL_IMAGES if which == "pixtral" else LLAVA_IMAGES
    offset = 3000 if which == "pixtral" else 3100
    for i, (name, (w, h)) in enumerate(table.items()):
        mf.test_image(w, h, mf.SEED + offset + i).save(images_dir / f"{name}.png")
    name = f"{which}-alpha-40x30"
    alpha_image(*ALPHA_IMAGES[name], mf.SEED + offset + 50).save(images_dir / f"{name}.png")


def load_image(images_dir, name):
    return Image.open(images_dir / f"{name}.png")


# ------------------------------------------------------------------------------------------------
# Processors and their files
# ------------------------------------------------------------------------------------------------

PIXTRAL_LONGEST_EDGE = 128
PIXTRAL_PATCH = 16
LLAVA_IMAGE = 84
LLAVA_PATCH = 14


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def pixtral_preprocessor_config():
    """preprocessor_config.json as pixtral-12b has it (transformers 4.45, slow PixtralImageProcessor)."""
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": CLIP_MEAN, "image_processor_type": "PixtralImageProcessor", "image_std": CLIP_STD,
        "patch_size": {"height": PIXTRAL_PATCH, "width": PIXTRAL_PATCH}, "processor_class": "PixtralProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"longest_edge": PIXTRAL_LONGEST_EDGE},
    }


def pixtral_processor_config():
    return {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
            "patch_size": PIXTRAL_PATCH, "processor_class": "PixtralProcessor"}


def llava_preprocessor_config():
    """preprocessor_config.json as llava-hf/llava-1.5-7b-hf has it (CLIPImageProcessor), sizes 336 -> 84."""
    return {
        "crop_size": {"height": LLAVA_IMAGE, "width": LLAVA_IMAGE}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": LLAVA_IMAGE},
    }


def llava_processor_config(strategy):
    return {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": LLAVA_PATCH,
            "processor_class": "LlavaProcessor", "vision_feature_select_strategy": strategy}


def write_pixtral_hub_processor_files(model_dir, tok):
    """tokenizer.json, tokenizer_config.json (4.45 shape), chat_template.json, flat preprocessor_config.json,
    processor_config.json: the file set of mistral-community/pixtral-12b."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(model_dir)
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (model_dir / extra).unlink(missing_ok=True)
    write_json(model_dir / "tokenizer_config.json", pixtral_tokenizer_config())
    write_json(model_dir / "chat_template.json", {"chat_template": PIXTRAL_CHAT_TEMPLATE})
    write_json(model_dir / "preprocessor_config.json", pixtral_preprocessor_config())
    write_json(model_dir / "processor_config.json", pixtral_processor_config())


def write_llava_hub_processor_files(model_dir, tok, strategy):
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(model_dir)
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (model_dir / extra).unlink(missing_ok=True)
    write_json(model_dir / "tokenizer_config.json", llava_tokenizer_config(tok))
    write_json(model_dir / "chat_template.json", {"chat_template": LLAVA_CHAT_TEMPLATE})
    write_json(model_dir / "preprocessor_config.json", llava_preprocessor_config())
    write_json(model_dir / "processor_config.json", llava_processor_config(strategy))


def pixtral_processor(tok):
    image = PixtralImageProcessor(size={"longest_edge": PIXTRAL_LONGEST_EDGE},
                                  patch_size={"height": PIXTRAL_PATCH, "width": PIXTRAL_PATCH},
                                  image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    return PixtralProcessor(image_processor=image, tokenizer=tok, patch_size=PIXTRAL_PATCH,
                            chat_template=PIXTRAL_CHAT_TEMPLATE)


def load_processor(model_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return AutoProcessor.from_pretrained(model_dir)


def hub_processor(family, strategy="default"):
    """The processor of a hub-layout checkpoint: files written to a scratch directory, loaded with AutoProcessor.
    Its tokenizer gets `raw` = the bare `tokenizers.Tokenizer` of the saved tokenizer.json (what the Rust crate loads),
    so the references can check that both give the same ids."""
    with tempfile.TemporaryDirectory() as tmp:
        if family == "pixtral":
            tok = build_pixtral_tokenizer()
            write_pixtral_hub_processor_files(Path(tmp), tok)
        else:
            tok = build_llava_tokenizer()
            write_llava_hub_processor_files(Path(tmp), tok, strategy)
        processor = load_processor(tmp)
        processor.raw_tokenizer = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
        return processor


def check_raw_ids(processor, text, ids):
    """tokenizer.json alone (the `tokenizers` library: what the Rust crate runs) gives transformers' ids."""
    raw = getattr(processor, "raw_tokenizer", None)
    if raw is not None:
        assert raw.encode(text).ids == list(ids), ("tokenizer.json disagrees with transformers", text)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def padded_vocab(n, multiple=64):
    return (n + multiple - 1) // multiple * multiple


def pixtral_config(tok):
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, image_size=PIXTRAL_LONGEST_EDGE, patch_size=PIXTRAL_PATCH, hidden_act="silu",
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5,
                max_position_embeddings=4096, sliding_window=None, hidden_act="silu", tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0}, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                         image_seq_length=1, projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="full", multimodal_projector_bias=True,
                         tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return config


LLAVA_VARIANTS = {
    "llava": dict(bias=True, strategy="default", layer=-2),
    "llava-nobias": dict(bias=False, strategy="full", layer=[-3, -1]),
}


def llava_config(tok, variant):
    v = LLAVA_VARIANTS[variant]
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, image_size=LLAVA_IMAGE, patch_size=LLAVA_PATCH, projection_dim=16)
    text = dict(model_type="llama", vocab_size=padded_vocab(len(tok)), hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu",
                bos_token_id=1, eos_token_id=2, pad_token_id=tok.convert_tokens_to_ids("<pad>"))
    per_image = (LLAVA_IMAGE // LLAVA_PATCH) ** 2 + (v["strategy"] == "full")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=per_image, projector_hidden_act="gelu", vision_feature_layer=v["layer"],
                         vision_feature_select_strategy=v["strategy"], multimodal_projector_bias=v["bias"],
                         tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return config


def build_model(config):
    model = LlavaForConditionalGeneration(config)
    model.eval()
    return model


def rerandomise_llava(model, seed, tokenizer_size):
    """make_fixtures.rerandomise, then: Pixtral's `ln_pre` RMSNorm weight (no "norm" in its name) gets 1 + 0.2 N like
    every other norm weight; CLIP's class embedding and position table 0.5 N (so both matter). Embedding / lm_head
    rows past the tokenizer (vocab padding) are scaled by 0.1, like the untrained rows of real checkpoints."""
    mf.rerandomise(model, seed)
    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("vision_tower.ln_pre.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("embeddings.class_embedding") or name.endswith("embeddings.position_embedding.weight"):
                p.copy_(0.5 * noise)
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                p[tokenizer_size:] *= 0.1


# ------------------------------------------------------------------------------------------------
# Prompts ("cases") and the reference activations of one case
# ------------------------------------------------------------------------------------------------

def pixtral_text(text):
    """A text chunk as the pixtral-12b template reads it (chunk["content"])."""
    return {"type": "text", "content": text}


def llava_text(text):
    return {"type": "text", "text": text}


def image_part(name):
    return {"type": "image", "image": f"{name}.png"}


def case_specs(family):
    """name -> list of rows, each a list of messages; images by file name (tests/fixtures/images/)."""
    if family == "pixtral":
        return {
            "single": [[{"role": "user", "content": [image_part("pixtral-200x120"),
                                                     pixtral_text("What is in this image?")]}]],
            "two_images": [[
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [pixtral_text("Compare "), image_part("pixtral-60x100"),
                                             pixtral_text(" with "), image_part("pixtral-130x50"),
                                             pixtral_text(", please.")]}]],
        }
    return {
        "single": [[{"role": "user", "content": [image_part("llava-120x80"), llava_text("What is in this image?")]}]],
        "batch": [
            [{"role": "user", "content": [image_part("llava-60x100"), llava_text("Color?")]}],
            [{"role": "user", "content": [image_part("llava-90x90"),
                                          llava_text("Describe the picture in detail. How many people are there?")]}],
        ],
    }


def expand(text, offsets):
    """The prompt after placeholder expansion, rebuilt from the processor's replacement offsets."""
    out, last = [], 0
    for item in offsets:
        start, end = item["span"]
        out.append(text[last:start])
        out.append(item["replacement"])
        last = end
    out.append(text[last:])
    return "".join(out)


def process_case(processor, images_dir, rows):
    """Render each row with the checkpoint's chat template, then run the processor on the batch (left padding)."""
    prompts, images = [], []
    for messages in rows:
        prompts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        for message in messages:
            if isinstance(message["content"], str):
                continue
            for part in message["content"]:
                if part["type"] == "image":
                    images.append(load_image(images_dir, part["image"][:-len(".png")]))
    padding = dict(padding=True, padding_side="left") if len(prompts) > 1 else {}
    inputs = processor(text=prompts, images=images, return_tensors="pt", return_text_replacement_offsets=True,
                       **padding)
    offsets = inputs.pop("text_replacement_offsets")
    expanded = [expand(p, o) for p, o in zip(prompts, offsets)]
    tok = processor.tokenizer
    for row, text in enumerate(expanded):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        assert tok(text)["input_ids"] == ids, "expanded prompt does not re-tokenize to the processor's ids"
        check_raw_ids(processor, text, ids)
    info = {
        "messages": rows if len(rows) > 1 else rows[0],
        "prompt": prompts if len(prompts) > 1 else prompts[0],
        "prompt_expanded": expanded if len(expanded) > 1 else expanded[0],
        "images": [{"file": f"images/{img.filename.rsplit('/', 1)[-1]}", "width": img.size[0], "height": img.size[1]}
                   for img in images],
    }
    return inputs, info


def to_u8_levels(pixel_values, sizes=None):
    """Undo the fused rescale + normalise; assert the uint8 levels reproduce the floats exactly. With `sizes`
    (Pixtral's padded batch), only each image's top-left sizes[i] region holds pixels; the rest must be exactly 0.0
    and is stored as level 0."""
    mean255 = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std255 = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    pv = pixel_values.float()
    levels = (pv * std255 + mean255).round().clamp(0, 255)
    again = (levels - mean255) / std255
    n, _, h, w = pv.shape
    valid = torch.ones(n, 1, h, w, dtype=torch.bool)
    if sizes is not None:
        valid[:] = False
        for i, (sh, sw) in enumerate(sizes):
            valid[i, :, :sh, :sw] = True
    valid = valid.expand(n, 3, h, w)
    assert torch.equal(again[valid], pv[valid]), "pixel values are not (u8 - mean*255) / (std*255) in float32"
    assert torch.all(pv[~valid] == 0.0), "padding is not 0.0"
    levels[~valid] = 0
    return levels.to(torch.uint8).contiguous()


def from_u8_levels(levels, sizes=None):
    mean255 = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std255 = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    pv = (levels.float() - mean255) / std255
    if sizes is not None:
        mask = torch.zeros_like(pv, dtype=torch.bool)
        for i, (sh, sw) in enumerate(sizes):
            mask[i, :, :sh, :sw] = True
        pv[~mask] = 0.0
    return pv


def top2_margins(logits):
    top = torch.topk(logits.float(), 2, dim=-1).values
    return (top[..., 0] - top[..., 1]).flatten().tolist()


@torch.no_grad()
def generate_traced(model, inputs, pad_id):
    """Batched greedy `generate`, recording the position_ids the language model got at every forward."""
    lm = model.model.language_model
    calls = []
    original = lm.forward

    def forward(*args, **kwargs):
        calls.append(kwargs["position_ids"].detach().clone())
        return original(*args, **kwargs)

    lm.forward = forward
    try:
        out = model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    finally:
        del lm.forward
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    step_logits = torch.stack([l.float() for l in out.logits], dim=1)  # [B, steps, V]
    return tokens, step_logits, calls


@torch.no_grad()
def reference_case(model, inputs, family, pad_id, full_logits):
    """All reference tensors of one case (names without the case prefix) and the greedy margins."""
    t = {"input_ids": inputs["input_ids"].to(torch.int64).contiguous(),
         "attention_mask": inputs["attention_mask"].to(torch.int64).contiguous()}
    pixel_values = inputs["pixel_values"].float()
    config = model.config
    kwargs = {}
    if family == "pixtral":
        sizes = inputs["image_sizes"].tolist()
        t["image_sizes"] = inputs["image_sizes"].to(torch.int64).contiguous()
        t["pixel_values_u8"] = to_u8_levels(pixel_values, sizes)
        kwargs["image_sizes"] = inputs["image_sizes"]
    else:
        t["pixel_values_u8"] = to_u8_levels(pixel_values)

    tower = model.model.vision_tower
    vout = tower(pixel_values, output_hidden_states=True, **kwargs)
    hidden = torch.stack(vout.hidden_states)  # [layers+1, B, T, C]
    layer = config.vision_feature_layer
    layers = [layer] if isinstance(layer, int) else list(layer)
    picked = [vout.hidden_states[i] for i in layers]
    if config.vision_feature_select_strategy == "default":
        picked = [h[:, 1:] for h in picked]
    selected = torch.cat(picked, dim=-1)
    if family == "pixtral":
        t["vision_hidden_states"] = hidden[:, 0].contiguous()  # [layers+1, P, C] (one packed sequence)
        t["vision_selected"] = selected[0].contiguous()
        # positions and the 2D RoPE tables, as the tower builds them
        grid = [(h // tower.patch_size, w // tower.patch_size) for h, w in sizes]
        pos = torch.cat([torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1)
                         .reshape(-1, 2) for gh, gw in grid])
        cos, sin = tower.patch_positional_embedding(vout.last_hidden_state, pos)
        t["vision_position_ids"] = pos.to(torch.int64).contiguous()
        t["vision_rope_cos"] = cos.float().contiguous()
        t["vision_rope_sin"] = sin.float().contiguous()
    else:
        t["vision_hidden_states"] = hidden.contiguous()
        t["vision_selected"] = selected.contiguous()
    feats = model.model.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output
    feats = torch.cat(list(feats), dim=0) if family == "pixtral" else torch.stack(list(feats))
    assert torch.allclose(feats, model.model.multi_modal_projector(selected).reshape(feats.shape), atol=1e-6)
    t["image_features"] = feats.contiguous()

    position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).masked_fill(inputs["attention_mask"] == 0, 0)
    t["position_ids"] = position_ids.contiguous()
    logits = model(**inputs, position_ids=position_ids).logits.float()
    if full_logits:
        t["logits"] = logits.contiguous()
    else:
        t["last_logits"] = logits[:, -1].contiguous()

    tokens, step_logits, calls = generate_traced(model, inputs, pad_id)
    assert torch.equal(step_logits.argmax(-1), tokens)
    assert (step_logits[:, 0] - logits[:, -1]).abs().max() < 1e-4, "generate's first step differs from the prompt"
    assert len(calls) == GREEDY_TOKENS and torch.equal(calls[0], position_ids)
    for step in range(1, GREEDY_TOKENS):
        assert torch.equal(calls[step][:, -1], position_ids[:, -1] + step)
    t["greedy_tokens"] = tokens.to(torch.int64).contiguous()
    t["greedy_step_logits"] = step_logits.contiguous()
    return t, top2_margins(step_logits)


def acceptable(tensors, margins, banned, vocab_in_tokenizer, min_distinct):
    if min(margins) < MIN_MARGIN:
        return False
    for row in tensors["greedy_tokens"].tolist():
        if len(set(row)) < min_distinct or any(tok in banned or tok >= vocab_in_tokenizer for tok in row):
            return False
    return True


def seeded(build, first_seed, case_inputs, family, tok, pad_id, banned):
    """The first seed whose greedy decoding is unambiguous in every case (each top-1/top-2 gap >= 0.05 in f32 and
    with the weights rounded to bf16), varied (>= 3 distinct tokens in the single-image case, >= 2 in every other
    row) and free of control / image / padding tokens and of ids past the tokenizer."""
    for seed in range(first_seed, first_seed + 200):
        model = build()
        rerandomise_llava(model, seed, len(tok))
        rounded = mf.rounded_to_bf16(model)
        results, margins, ok = {}, {}, True
        for name, inputs in case_inputs.items():
            full = name == "single"
            tensors, m = reference_case(model, inputs, family, pad_id, full)
            _, m16 = reference_case(rounded, inputs, family, pad_id, full)
            if not acceptable(tensors, m + m16, banned, len(tok), 3 if name == "single" else 2):
                ok = False
                break
            results[name], margins[name] = tensors, m
        if ok:
            return model, seed, results, margins
        print(f"    seed {seed} rejected ({name})")
    raise SystemExit("no seed gave unambiguous greedy tokens")


# ------------------------------------------------------------------------------------------------
# Reference files
# ------------------------------------------------------------------------------------------------

TENSOR_NOTES = {
    "pixel_values_u8": "uint8 levels; model input = (f32(u8) - f32(f32(mean) * 255)) / f32(f32(std) * 255) (CLIP "
                       "mean/std), bit-exactly the processor's floats. Pixtral: [N, 3, maxH, maxW], image i in the "
                       "top-left image_sizes[i] region, the rest is padding (0.0 in the model input, 0 here, never read)",
    "image_sizes": "Pixtral: [N, 2] (height, width) of each resized image, multiples of 16",
    "vision_hidden_states": "Pixtral: [layers+1, P, C], all images packed in one sequence (P = sum of rows*cols); "
                            "LLaVA: [layers+1, B, 1+patches, C]. Index 0 = input of block 0 (ln_pre / pre_layrnorm "
                            "output), index k = output of block k-1; no final norm (CLIP post_layernorm unused)",
    "vision_position_ids": "Pixtral: [P, 2] (row, col) of every patch inside its own image (row-major per image)",
    "vision_rope_cos": "Pixtral: [P, head_dim] cos of the 2D RoPE (rotate-half layout): per patch cat(f, f) with "
                       "f = cat(row * inv_freq[0::2], col * inv_freq[1::2]), inv_freq = theta^(-arange(0, d, 2)/d)",
    "vision_rope_sin": "as vision_rope_cos, sin",
    "vision_selected": "what enters the projector: hidden_states[vision_feature_layer] (list: concatenated on the "
                       "channel axis), CLS dropped for strategy 'default'",
    "image_features": "projector output linear_2(gelu(linear_1(x))); Pixtral [P, H] (images concatenated, scattered "
                      "in order onto the [IMG] positions), LLaVA [B, T, H] (onto the <image> positions)",
    "position_ids": "[B, L] cumsum(attention_mask) - 1, 0 at padding: what generate gives the decoder (a plain "
                    "forward without position_ids would use 0..L-1 even on left-padded rows)",
    "logits": "[B, L, V] prompt logits with those position_ids",
    "last_logits": "[B, V] the same at the last position only",
    "greedy_tokens": "[B, 8] generate(do_sample=False, max_new_tokens=8, eos_token_id=None)",
    "greedy_step_logits": "[B, 8, V] logits of every greedy step (step 0 = last prompt position), KV cache; decode "
                          "step s feeds position position_ids[:, -1] + s",
}


def write_reference(out_dir, name, results, margins, infos, notes):
    ref_dir = out_dir / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{case}.{key}": value for case, t in results.items() for key, value in t.items()}
    save_file(tensors, str(ref_dir / f"{name}.safetensors"))
    all_margins = [m for case in margins.values() for m in case]
    assert min(all_margins) >= MIN_MARGIN
    cases = {}
    for case, t in results.items():
        cases[case] = {
            **infos[case],
            "greedy_tokens": t["greedy_tokens"].tolist(),
            "greedy_margins": margins[case],
            "min_margin": min(margins[case]),
            "tensors": {key: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for key, v in t.items()},
        }
    meta = {
        **notes,
        "min_margin": min(all_margins),
        "computed": "float32, eager attention, transformers' own processor (AutoProcessor from the checkpoint files, "
                    "torchvision backend) and model; greedy = generate(do_sample=False, max_new_tokens=8, "
                    "eos_token_id=None)",
        "tensor_notes": TENSOR_NOTES,
        "cases": cases,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    write_json(ref_dir / f"{name}.json", meta)
    summary = {case: t["greedy_tokens"].tolist() for case, t in results.items()}
    print(f"  {name}: seed {notes['seed']}, min greedy margin {min(all_margins):.3f}, tokens {summary}")


def describe_model(model):
    c = model.config
    keep_v = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim", "patch_size",
              "image_size", "hidden_act", "rope_parameters", "layer_norm_eps")
    keep_t = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "sliding_window")
    return {"vision_config": {k: v for k, v in c.vision_config.to_dict().items() if k in keep_v},
            "text_config": {k: v for k, v in c.text_config.to_dict().items() if k in keep_t},
            "vision_feature_layer": c.vision_feature_layer,
            "vision_feature_select_strategy": c.vision_feature_select_strategy,
            "multimodal_projector_bias": c.multimodal_projector_bias,
            "image_token_id": c.image_token_id}


def finish_infos(infos, results, tok, family):
    for case, info in infos.items():
        info["greedy_text"] = [tok.decode(row) for row in results[case]["greedy_tokens"].tolist()]
        if family == "pixtral":
            sizes = results[case]["image_sizes"].tolist()
            for image, (h, w) in zip(info["images"], sizes):
                image.update(resized_height=h, resized_width=w, rows=h // PIXTRAL_PATCH, cols=w // PIXTRAL_PATCH)


# ------------------------------------------------------------------------------------------------
# Checkpoint writers
# ------------------------------------------------------------------------------------------------

def legacy_state_dict(model, vision_prefix="vision_tower."):
    """transformers-5 in-memory names -> the transformers-4 hub names (`language_model.model.*`,
    `language_model.lm_head.weight`, `<vision_prefix>*`, `multi_modal_projector.*`)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "language_model.model." + key[len("model.language_model."):]
        elif key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        elif key.startswith("model.vision_tower."):
            key = vision_prefix + key[len("model.vision_tower."):]
        elif key.startswith("model.multi_modal_projector."):
            key = key[len("model."):]
        else:
            raise AssertionError(key)
        out[key] = value.detach().contiguous().clone()
    return out


def save_weights(state, model_dir):
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def pixtral_hub_config(model):
    """config.json in the shape of mistral-community/pixtral-12b's (transformers 4.45): rope_theta, torch_dtype,
    is_composition, image_seq_length 1, no multimodal_projector_bias (default true), text bos/eos/hidden_act left to
    the Mistral defaults (1, 2, silu)."""
    c, v, t = model.config, model.config.vision_config, model.config.text_config
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": 1,
        "image_token_index": c.image_token_id,
        "model_type": "llava",
        "projector_hidden_act": "gelu",
        "text_config": {
            "head_dim": t.head_dim,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "is_composition": True,
            "max_position_embeddings": t.max_position_embeddings,
            "model_type": "mistral",
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_parameters["rope_theta"],
            "sliding_window": None,
            "vocab_size": t.vocab_size,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.45.0.dev0",
        "vision_config": {
            "head_dim": v.head_dim,
            "hidden_act": v.hidden_act,
            "hidden_size": v.hidden_size,
            "image_size": v.image_size,
            "intermediate_size": v.intermediate_size,
            "is_composition": True,
            "model_type": "pixtral",
            "num_attention_heads": v.num_attention_heads,
            "num_hidden_layers": v.num_hidden_layers,
            "patch_size": v.patch_size,
            "rope_theta": v.rope_parameters["rope_theta"],
            "tie_word_embeddings": False,
        },
        "vision_feature_layer": c.vision_feature_layer,
        "vision_feature_select_strategy": c.vision_feature_select_strategy,
    }


def llava_hub_config(model, tok):
    """config.json in the shape of llava-hf/llava-1.5-7b-hf's (transformers 4.36): partial text_config (Llama
    defaults for rope_theta 1e4, hidden_act silu, bos 1 / eos 2), partial vision_config (CLIP defaults: quick_gelu,
    layer_norm_eps 1e-5), top-level pad_token_id and the deprecated vocab_size."""
    c, v, t = model.config, model.config.vision_config, model.config.text_config
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": c.image_seq_length,
        "image_token_index": c.image_token_id,
        "model_type": "llava",
        "pad_token_id": tok.convert_tokens_to_ids("<pad>"),
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "model_type": "llama",
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "torch_dtype": "float32",
            "vocab_size": t.vocab_size,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": v.hidden_size,
            "image_size": v.image_size,
            "intermediate_size": v.intermediate_size,
            "model_type": "clip_vision_model",
            "num_attention_heads": v.num_attention_heads,
            "num_hidden_layers": v.num_hidden_layers,
            "patch_size": v.patch_size,
            "projection_dim": v.projection_dim,
            "vocab_size": 32000,
        },
        "vision_feature_layer": c.vision_feature_layer,
        "vision_feature_select_strategy": c.vision_feature_select_strategy,
        "vocab_size": t.vocab_size,
    }
    if not c.multimodal_projector_bias:
        config["multimodal_projector_bias"] = False
    return config


def save_pixtral_hub(model, model_dir, tok):
    save_weights(legacy_state_dict(model), model_dir)
    write_json(model_dir / "config.json", pixtral_hub_config(model))
    write_pixtral_hub_processor_files(model_dir, tok)
    write_json(model_dir / "generation_config.json",
               {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                "transformers_version": "4.45.0.dev0"})


def save_pixtral_hf5(model, model_dir, tok):
    """What transformers 5 writes with save_original_format=False and processor.save_pretrained, plus the flat
    preprocessor_config.json."""
    model.save_pretrained(model_dir, save_original_format=False)
    processor = pixtral_processor(tok)
    processor.save_pretrained(model_dir)
    processor.image_processor.save_pretrained(model_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(model_dir)


def save_llava_hub(model, model_dir, tok, strategy):
    save_weights(legacy_state_dict(model, vision_prefix="vision_tower.vision_model."), model_dir)
    write_json(model_dir / "config.json", llava_hub_config(model, tok))
    write_llava_hub_processor_files(model_dir, tok, strategy)
    write_json(model_dir / "generation_config.json",
               {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": tok.convert_tokens_to_ids("<pad>"), "transformers_version": "4.36.0.dev0"})


@torch.no_grad()
def check_saved(model_dir, family, images_dir, specs, reference, expected_model):
    """Reload checkpoint + processor from the directory: same parameters, same processed inputs, same logits."""
    processor = load_processor(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    loaded = model.state_dict()
    for key, value in expected_model.state_dict().items():
        assert torch.equal(loaded[key], value), (model_dir, key)
    assert model.config.vision_feature_layer == expected_model.config.vision_feature_layer
    assert model.config.multimodal_projector_bias == expected_model.config.multimodal_projector_bias
    for name, rows in specs.items():
        inputs, _ = process_case(processor, images_dir, rows)
        ref = reference[name]
        assert torch.equal(inputs["input_ids"], ref["input_ids"]), (model_dir, name)
        sizes = inputs["image_sizes"].tolist() if family == "pixtral" else None
        assert torch.equal(to_u8_levels(inputs["pixel_values"], sizes), ref["pixel_values_u8"]), (model_dir, name)
        logits = model(**inputs, position_ids=ref["position_ids"]).logits.float()
        expected = ref["logits"] if "logits" in ref else ref["last_logits"]
        got = logits if "logits" in ref else logits[:, -1]
        assert (got - expected).abs().max() < 1e-5, (model_dir, name, (got - expected).abs().max())
        # the stored levels reproduce the model input exactly
        assert torch.equal(from_u8_levels(ref["pixel_values_u8"], sizes), inputs["pixel_values"].float())
    print(f"  checked {model_dir.name}: reloads and reproduces {list(specs)}")


# ------------------------------------------------------------------------------------------------
# Fixture groups
# ------------------------------------------------------------------------------------------------

def case_inputs_for(processor, images_dir, family):
    specs = case_specs(family)
    inputs, infos = {}, {}
    for case, rows in specs.items():
        inputs[case], infos[case] = process_case(processor, images_dir, rows)
    return specs, inputs, infos


def make_pixtral(out_dir):
    images_dir = out_dir / "images"
    write_images(images_dir, "pixtral")
    tok = build_pixtral_tokenizer()
    processor = hub_processor("pixtral")
    specs, inputs, infos = case_inputs_for(processor, images_dir, "pixtral")
    banned = set(range(PIXTRAL_NUM_SPECIALS))
    model, seed, results, margins = seeded(lambda: build_model(pixtral_config(tok)), mf.SEED + 3000, inputs,
                                           "pixtral", tok, pad_id=tok.convert_tokens_to_ids("<pad>"), banned=banned)
    finish_infos(infos, results, tok, "pixtral")
    notes = {"family": "LlavaForConditionalGeneration + PixtralVisionModel + MistralForCausalLM", "seed": seed,
             "checkpoints": ["pixtral", "pixtral-hf5"], "model": describe_model(model),
             "token_ids": {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "[INST]", "[/INST]", "[IMG]",
                                                                      "[IMG_BREAK]", "[IMG_END]", "<pad>")},
             "bos": "from the chat template ('<s>' as text); the tokenizer adds none",
             "image_tokens": "per image: rows x ([IMG] x cols + [IMG_BREAK]), the last [IMG_BREAK] replaced by "
                             "[IMG_END]; only [IMG] positions receive image_features (row-major), [IMG_BREAK] / "
                             "[IMG_END] keep their token embeddings"}
    write_reference(out_dir, "pixtral", results, margins, infos, notes)
    models_dir = out_dir / "models"
    save_pixtral_hub(model, models_dir / "pixtral", tok)
    save_pixtral_hf5(model, models_dir / "pixtral-hf5", tok)
    for checkpoint in ("pixtral", "pixtral-hf5"):
        check_saved(models_dir / checkpoint, "pixtral", images_dir, specs, results, model)


def make_llava(out_dir):
    images_dir = out_dir / "images"
    write_images(images_dir, "llava")
    tok = build_llava_tokenizer()
    image_id, pad_id = tok.convert_tokens_to_ids(["<image>", "<pad>"])
    for variant, first_seed in (("llava", mf.SEED + 3100), ("llava-nobias", mf.SEED + 3200)):
        strategy = LLAVA_VARIANTS[variant]["strategy"]
        processor = hub_processor("llava", strategy)
        specs, inputs, infos = case_inputs_for(processor, images_dir, "llava")
        model, seed, results, margins = seeded(lambda: build_model(llava_config(tok, variant)), first_seed, inputs,
                                               "llava", tok, pad_id=pad_id, banned={0, 1, 2, image_id, pad_id})
        finish_infos(infos, results, tok, "llava")
        notes = {"family": "LlavaForConditionalGeneration + CLIPVisionModel + LlamaForCausalLM", "seed": seed,
                 "checkpoints": [variant], "model": describe_model(model),
                 "token_ids": {t: tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")},
                 "tokenizer_size": len(tok),
                 "bos": "added by the tokenizer (post-processor); the chat template writes none",
                 "image_tokens": f"{model.config.image_seq_length} <image> per image "
                                 f"(strategy {strategy!r}: {'CLS dropped' if strategy == 'default' else 'CLS kept'})"}
        write_reference(out_dir, variant, results, margins, infos, notes)
        save_llava_hub(model, out_dir / "models" / variant, tok, strategy)
        check_saved(out_dir / "models" / variant, "llava", images_dir, specs, results, model)


# ------------------------------------------------------------------------------------------------
# Processor references
# ------------------------------------------------------------------------------------------------

PIXTRAL_PROCESSOR_IMAGES = ["pixtral-tiny-1x1", "pixtral-17x17", "pixtral-200x101", "pixtral-wide-300x41",
                            "pixtral-tall-30x200", "pixtral-129x129", "pixtral-128x48", "pixtral-alpha-40x30"]
LLAVA_PROCESSOR_IMAGES = ["llava-tiny-10x10", "llava-wide-300x41", "llava-tall-30x200", "llava-87x84",
                          "llava-100x57", "llava-alpha-40x30"]

# Chat-template renders (no images loaded: text only), through each family's template and tokenizer.
TEMPLATE_CASES = {
    "pixtral": [
        [{"role": "user", "content": [image_part("x"), pixtral_text("Describe it.")]}],
        [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": "Hi there."},
         {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": [pixtral_text("What is this? "), image_part("x")]}],
        [{"role": "user", "content": "Only text, no image."}],
        # standard OpenAI-style text chunks: the pixtral-12b template reads chunk["content"], so these render EMPTY
        [{"role": "user", "content": [{"type": "text", "text": "ignored by this template"}, image_part("x")]}],
    ],
    "llava": [
        [{"role": "user", "content": [llava_text("What is shown?"), image_part("x")]}],
        [{"role": "system", "content": [llava_text("Answer briefly.")]},
         {"role": "user", "content": [image_part("x"), llava_text("What is it?")]},
         {"role": "assistant", "content": [llava_text("A picture.")]},
         {"role": "user", "content": [llava_text("Which colours?")]}],
        [{"role": "user", "content": [image_part("x"), image_part("y"), llava_text("Two images.")]}],
    ],
}


def pixtral_resize(height, width):
    """get_resize_output_image_size of transformers' Pixtral processor (longest_edge 128, patch 16)."""
    from transformers.models.pixtral.image_processing_pixtral import get_resize_output_image_size
    return get_resize_output_image_size(numpy.zeros((height, width, 3)), size=(PIXTRAL_LONGEST_EDGE,) * 2,
                                        patch_size=(PIXTRAL_PATCH, PIXTRAL_PATCH), input_data_format="channels_last")


# (height, width) -> resized (height, width) at the fixtures' geometry and at the real one (1024, 16).
RESIZE_CASES = [(1, 1), (15, 15), (16, 16), (17, 17), (120, 200), (101, 200), (100, 60), (50, 130), (41, 300),
                (200, 30), (129, 129), (48, 128), (128, 128), (127, 255), (255, 127), (1000, 1), (64, 65)]
REAL_RESIZE_CASES = [(876, 1300), (480, 640), (500, 316), (1024, 1024), (1025, 1025), (2000, 3000), (3000, 2000),
                     (768, 1024), (1080, 1920), (10, 5000)]


def write_llava_processor_fixtures(out_dir):
    images_dir = out_dir / "images"
    write_images(images_dir, "pixtral")
    write_images(images_dir, "llava")
    proc_dir = out_dir / "processor"
    proc_dir.mkdir(parents=True, exist_ok=True)
    for old in list(proc_dir.glob("pixtral-*")) + list(proc_dir.glob("llava-*")):
        old.unlink()
    processors = {"pixtral": hub_processor("pixtral"), "llava": hub_processor("llava", "default")}
    cases = []
    for family, names in (("pixtral", PIXTRAL_PROCESSOR_IMAGES), ("llava", LLAVA_PROCESSOR_IMAGES)):
        processor = processors[family]
        text = pixtral_text if family == "pixtral" else llava_text
        for name in names:
            image = load_image(images_dir, name)
            messages = [{"role": "user", "content": [image_part(name), text("Describe it.")]}]
            prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out = processor(text=[prompt], images=[image], return_tensors="pt", return_text_replacement_offsets=True)
            offsets = out.pop("text_replacement_offsets")
            pv = out["pixel_values"].float()
            entry = {"name": name, "family": family, "image": f"images/{name}.png", "width": image.size[0],
                     "height": image.size[1], "mode": image.mode, "messages": messages, "prompt": prompt,
                     "prompt_expanded": expand(prompt, offsets[0]), "file": f"processor/{name}.safetensors"}
            tensors = {"input_ids": out["input_ids"][0].to(torch.int64).contiguous()}
            check_raw_ids(processor, entry["prompt_expanded"], tensors["input_ids"].tolist())
            if family == "pixtral":
                (h, w), = out["image_sizes"].tolist()
                assert (h, w) == tuple(pixtral_resize(image.size[1], image.size[0])) == tuple(pv.shape[-2:])
                tensors["image_sizes"] = out["image_sizes"].to(torch.int64).contiguous()
                entry.update(resized_height=h, resized_width=w, rows=h // PIXTRAL_PATCH, cols=w // PIXTRAL_PATCH)
            else:
                entry.update(image_tokens=int((out["input_ids"] == processor.image_token_id).sum()))
            tensors["pixel_values_u8"] = to_u8_levels(pv)
            save_file(tensors, str(proc_dir / f"{name}.safetensors"))
            cases.append(entry)
            print(f"  processor {name}: pixels {list(pv.shape)}, {len(tensors['input_ids'])} tokens")
    templates = []
    for family, conversations in TEMPLATE_CASES.items():
        processor = processors[family]
        for messages in conversations:
            rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            check_raw_ids(processor, rendered, processor.tokenizer(rendered)["input_ids"])
            templates.append({"family": family, "messages": messages, "add_generation_prompt": True,
                              "rendered": rendered, "input_ids": processor.tokenizer(rendered)["input_ids"]})
    index = {
        "processors": {
            "pixtral": {"checkpoint": "models/pixtral", "longest_edge": PIXTRAL_LONGEST_EDGE,
                        "patch_size": PIXTRAL_PATCH, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                        "resample": "bicubic (3)", "tokenizer_adds_bos": False},
            "llava": {"checkpoint": "models/llava", "shortest_edge": LLAVA_IMAGE, "crop_size": LLAVA_IMAGE,
                      "patch_size": LLAVA_PATCH, "num_additional_image_tokens": 1,
                      "vision_feature_select_strategy": "default", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                      "resample": "bicubic (3)", "tokenizer_adds_bos": True},
        },
        "pixel_values": "pixel_values_u8 [1, 3, H, W]; the processor's floats are "
                        "(f32(u8) - f32(f32(mean) * 255)) / f32(f32(std) * 255), bit-exactly",
        "resize": "torchvision antialiased bicubic on uint8 (PIL input converted to RGB first: alpha composited on "
                  "white); Pixtral: straight to the rounded-up size (aspect not kept exactly); LLaVA: short side -> "
                  "84, long side int(84 * long / short), then centre crop top = int((H - 84) / 2), "
                  "left = int((W - 84) / 2)",
        "cases": cases,
        "templates": templates,
        "pixtral_resize": {
            "function": "transformers.models.pixtral.image_processing_pixtral.get_resize_output_image_size: ratio = "
                        "max(h / L, w / L); if ratio > 1: h = floor(h / ratio), w = floor(w / ratio); then each side "
                        "rounded UP to a multiple of the patch: ((s - 1) // p + 1) * p",
            "longest_edge_128": [{"height": h, "width": w, "result": list(pixtral_resize(h, w))}
                                 for h, w in RESIZE_CASES],
            "longest_edge_1024": [],
        },
    }
    from transformers.models.pixtral.image_processing_pixtral import get_resize_output_image_size
    for h, w in REAL_RESIZE_CASES:
        r = get_resize_output_image_size(numpy.zeros((h, w, 3)), size=(1024, 1024), patch_size=(16, 16),
                                         input_data_format="channels_last")
        index["pixtral_resize"]["longest_edge_1024"].append({"height": h, "width": w, "result": list(r)})
    write_json(proc_dir / "llava-cases.json", index)


def make_pixtral_sliding(out_dir):
    """The committed pixtral checkpoint with its Mistral decoder's sliding window set to a few tokens (every Mistral
    config without the key gets 4096): the prompts (56 and 97 tokens) and their greedy steps then see only the
    window. The first window in SLIDING_WINDOWS whose greedy steps have clear margins is used; the test edits the
    copied config.json to it."""
    model_dir = out_dir / "models" / "pixtral"
    images_dir = out_dir / "images"
    processor = load_processor(model_dir)
    specs = case_specs("pixtral")
    full = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    for window in SLIDING_WINDOWS:
        config = AutoConfig.from_pretrained(model_dir)
        config.text_config.sliding_window = window
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                                              attn_implementation="eager")
        model.eval()
        results, margins, infos = {}, {}, {}
        for name, rows in specs.items():
            inputs, infos[name] = process_case(processor, images_dir, rows)
            results[name], margins[name] = reference_case(model, inputs, "pixtral", pad_id=11, full_logits=False)
            with torch.no_grad():
                unwindowed = full(**inputs).logits[:, -1].float()
            assert (unwindowed - results[name]["last_logits"]).abs().max() > 1e-2, "the window changes nothing"
        if min(m for case in margins.values() for m in case) >= MIN_MARGIN:
            break
    else:
        raise SystemExit(f"no window in {SLIDING_WINDOWS} gives clear greedy margins")
    notes = {"family": "pixtral with text_config.sliding_window = %d" % window, "seed": None,
             "checkpoints": ["pixtral (config.json edited: text_config.sliding_window)"],
             "sliding_window": window, "model": describe_model(model)}
    write_reference(out_dir, "pixtral-sliding", results, margins, infos, notes)


GROUP_FUNCTIONS = {
    "pixtral_sliding": make_pixtral_sliding,
    "pixtral": make_pixtral,
    "llava": make_llava,
    "llava_processor": write_llava_processor_fixtures,
}


def make_group(group, out_dir):
    GROUP_FUNCTIONS[group](out_dir)
