"""Qwen2.5-VL and Qwen3-VL parity fixtures, written by `make_fixtures.py --only GROUP` (this module is not a
script of its own; make_fixtures.py imports it when one of its groups runs).

    python3 scripts/make_fixtures.py --only qwen_vl_processor,qwen2_5_vl,qwen3_vl     # ~15 s on 2 cores, ~6.3 MB

Groups: qwen_vl_processor, qwen2_5_vl, qwen3_vl. Each rewrites only its own files (make_fixtures.GROUP_FILES); all
three also (re)write the shared input images, which are deterministic (same bytes every run). Everything is computed
in float32 with transformers itself (eager attention). The processors are transformers' own (torchvision backend),
loaded back with `AutoProcessor` from the checkpoint's files, and every checkpoint is reloaded with `from_pretrained`
and checked to reproduce the reference inputs and logits.

Tokenizer (all Qwen checkpoints): the 400-piece byte-level BPE of the other fixtures, then the added tokens in the
order (and at the offsets from <|endoftext|>) of the real Qwen2.5 / Qwen3 vocabularies:
    400 <|endoftext|>  401 <|im_start|>  402 <|im_end|>  403..408 <|object_ref_start|> .. <|quad_end|>
    409 <|vision_start|>  410 <|vision_end|>  411 <|vision_pad|>  412 <|image_pad|>  413 <|video_pad|>   (special)
    414 <tool_call>  415 </tool_call>  416..421 <|fim_prefix|> .. <|file_sep|>  422 <tool_response>
    423 </tool_response>  424 <think>  425 </think>   (added, not special)                       = 426 tokens
    eos_token <|im_end|>, pad_token <|endoftext|>, no bos / unk (as the Instruct checkpoints).
    generation_config.json: bos 400, pad 400, eos [402, 400], do_sample false.

Input images (tests/fixtures/images/, all RGB PNG made by make_fixtures.test_image): qwen-140x84 (width x height),
qwen-160x96, qwen-tall-50x150, qwen-wide-200x45, qwen-56x56, qwen-84x56, qwen-64x64, qwen-tiny-10x10,
qwen-tall-30x200, qwen-wide-300x41, qwen-big-320x240, qwen-half-98x70, qwen-half-112x80; a 5-frame 84x56 clip
images/video/frame_000.png .. frame_004.png (a scene rolled 7 px right per frame).

Models (tests/fixtures/models/; every parameter re-randomised, see `rerandomise_qwen`):
    qwen2_5-vl       Qwen2_5_VLForConditionalGeneration as the hub ships Qwen2.5-VL-*-Instruct: legacy tensor names
                     (`model.*`, `visual.*`, `lm_head.weight`), transformers-4 config (text keys flat at the top level,
                     `rope_scaling {"type": "mrope", "mrope_section": [2, 3, 3]}`, `rope_theta` 1e6, `torch_dtype`,
                     vision `model_type "qwen2_5_vl"`, `in_chans`, `spatial_patch_size`), untied. Vision: depth 4,
                     hidden 32, 2 heads (head_dim 16), MLP 48, patch 14, window_size 56 (vws = 2 merged tokens),
                     full attention in blocks [1, 3], windows in 0 and 2, tokens_per_second 2, out 64. Text: hidden
                     64, 4 heads / 2 KV heads (head_dim 16), MLP 64, 2 layers, qkv bias, vocab 426, rms eps 1e-6.
                     chat_template.json (+ the same template inside tokenizer_config.json) = the real Qwen2.5-VL
                     template (default system prompt "You are a helpful assistant."); flat preprocessor_config.json
                     and video_preprocessor_config.json: min_pixels 3136 (28*28*4), max_pixels 25088 (28*28*32),
                     CLIP mean/std, image_processor_type "Qwen2VLImageProcessor" (the hub's "Qwen2_5_VLImageProcessor"
                     is refused by transformers >= 5.11's AutoImageProcessor).
    qwen2_5-vl-hf5   the same weights saved by transformers 5 with `save_original_format=False`
                     (`model.language_model.*`, `model.visual.*`), nested text_config + `rope_parameters`, `dtype`,
                     vision `rope_parameters {"rope_type": "axial", "rope_theta": 10000}`; processor files as
                     `processor.save_pretrained` writes them (processor_config.json with both sub-processors nested,
                     chat_template.jinja) plus the flat preprocessor_config.json / video_preprocessor_config.json.
    qwen2_5-vl-tied  another seed, tie_word_embeddings true (no lm_head.weight in the file), a narrower vision tower
                     (hidden 16, head_dim 8, MLP 32), hub layout and transformers-4 config like qwen2_5-vl, and NO
                     video_preprocessor_config.json (the video processor falls back to preprocessor_config.json, as
                     for the real Qwen2.5-VL repos).
    qwen3-vl         Qwen3VLForConditionalGeneration as the hub ships Qwen3-VL-*-Instruct (`model.language_model.*`,
                     `model.visual.*`; tied, no lm_head.weight), transformers-4.57 config (nested; text_config
                     `rope_scaling {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": true}`,
                     `rope_theta` 5e6, `dtype`). Vision: depth 4, hidden 32, 2 heads, MLP 48, gelu_pytorch_tanh,
                     patch 16, num_position_embeddings 16 (4x4 learned grid, interpolated for every other grid),
                     deepstack_visual_indexes [0, 2], out 64. Text: hidden 64, 4 heads / 2 KV heads, head_dim 32
                     (explicit, != 64/4), MLP 64, 3 layers, q/k norm, no biases, vocab_size 432 (> the 426
                     tokenizer entries, as the real 151936 > 151665). chat_template.json (+ tokenizer_config.json) =
                     the real Qwen3-VL-Instruct template (no default system prompt). preprocessor_config.json size
                     {shortest_edge: 1024, longest_edge: 32768}, mean/std 0.5, type "Qwen2VLImageProcessorFast";
                     video_preprocessor_config.json size {shortest_edge: 4096, longest_edge: 32768} (whole-clip
                     budget), fps 2, do_sample_frames true (the references pass do_sample_frames=False).

References (tests/fixtures/reference/<weights>.safetensors + .json; tensor names are "<case>.<tensor>"):
    qwen2_5-vl (weights of qwen2_5-vl and qwen2_5-vl-hf5), qwen2_5-vl-tied, qwen3-vl. Cases:
    single       one image (Qwen2.5: qwen-140x84 -> grid (1,6,10), llm 3x5, 6 windows with padded edges; Qwen3:
                 qwen-160x96 -> grid (1,6,10), fractional interpolation taps on both axes); default system prompt
                 for Qwen2.5, none for Qwen3
    two_images   an explicit system message, then qwen-tall-50x150 and qwen-wide-200x45 in one user message (both
                 resized: Qwen2.5 (1,10,4) + (1,4,14), zero-length padded windows; Qwen3 (1,10,4) + (1,2,12))
    batch        two prompts of different lengths, left-padded (padding_side="left", pad 400): qwen-56x56 + "Color?"
                 and qwen-84x56 + a longer question (images in both rows: the image list spans the batch)
    video        the 5-frame clip, do_sample_frames=False, metadata fps 4 (qwen2_5-vl: second_per_grid_ts 0.5,
                 interval 1), fps 1.5 (qwen2_5-vl-tied: 4/3, interval 8/3 -> T offsets 0, 2, 5, longer than the
                 2x3 spatial span, so the text after the video resumes at +3 < the video's max T), fps 2 (qwen3-vl:
                 timestamps <0.2 seconds> <1.2 seconds> <2.0 seconds>, outer vision_start/end kept)
    image_video  (qwen3-vl only) qwen-64x64 then the clip in one message: joint deepstack scatter
    qwen2_5-vl-tied holds only single and video.
    Per case: input_ids, attention_mask, mm_token_type_ids [B, L]; pixel_values_u8 [N, 3*2*P*P] + image_grid_thw;
    pixel_values_videos_u8 + video_grid_thw (+ second_per_grid_ts, float32, Qwen2.5); position_ids [3, B, L] and
    rope_deltas [B, 1] from `model.model.get_rope_index`; Qwen2.5: vision_hidden [N, C] (after the last vision
    block, before the merger, in WINDOW order), window_index [N/4], cu_window_seqlens, image_embeds [N/4, 64]
    (merger output, un-permuted = image-pad order); Qwen3: image_embeds + deepstack_0, deepstack_1 [N/4, 64]; the
    same with a video_ prefix for videos; logits [B, L, V] (single, video) or last_logits [B, V] (batch,
    two_images, image_video); greedy_tokens [B, 8] (batched `generate`, do_sample=False, no eos stop);
    greedy_step_logits [B, 8, V] (every greedy step, KV cache); decode_position_ids [7, 3, B] (the M-RoPE rows
    `generate` gave the language model at each decode step: last prompt position + 1 + step on all rows). Pixel
    values are stored as the uint8 levels: the model input is (f32(u8) - f32(f32(mean)*255)) / f32(f32(std)*255),
    bit-exactly the processor's floats. The JSON has, per case, the messages, the rendered prompt before and after
    placeholder expansion, image files and sizes, video metadata, tensor shapes, greedy tokens / text / margins.

Processor references (tests/fixtures/processor/qwen-*.safetensors, qwen-cases.json, qwen-smart-resize.json): per
    image (qwen-tiny-10x10: upscaled by min_pixels; qwen-tall-30x200, qwen-wide-300x41; qwen-big-320x240: over
    max_pixels, scaled down; qwen-half-98x70 (70/28 = 2.5 -> 2, 98/28 = 3.5 -> 4) and qwen-half-112x80 (80/32 = 2.5,
    112/32 = 3.5): round half to even; alpha.png (RGBA, composited on white)) and family ("qwen2_5." / "qwen3." keys,
    the processors of the qwen2_5-vl / qwen3-vl checkpoints): image_grid_thw [1, 3], pixel_values_u8 [N, 3*2*P*P],
    input_ids of [user: image, "Describe it."] through the family's template. qwen-smart-resize.json: image
    smart_resize (h, w, factor, min, max) -> (h_bar, w_bar) and Qwen3 video smart_resize (frames, h, w, 2, 32, min,
    max) -> (h_bar, w_bar), errors included.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import (
    AutoProcessor,
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as image_smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_video_smart_resize
from transformers.video_utils import VideoMetadata
from transformers.vision_utils import get_vision_window_index

import make_fixtures as mf

GREEDY_TOKENS = mf.GREEDY_TOKENS
MIN_MARGIN = mf.NEW_MIN_MARGIN  # 0.05, in f32 and with the weights rounded to bf16, at every greedy step

# ------------------------------------------------------------------------------------------------
# Tokenizer and chat templates
# ------------------------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_ADDED_TOKENS = [  # added but not special, as in the real tokenizers
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]

# Qwen/Qwen2.5-VL-{3B,7B}-Instruct chat_template.json (also nvidia/Cosmos-Reason1-7B).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen3-VL-{2B,4B,8B}-Instruct chat_template.json (also nvidia/Cosmos-Reason2-2B/8B). Inside the Jinja string
# literals `\n` is a backslash + n (Jinja turns it into a newline), hence the raw string.
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def build_qwen_tokenizer():
    vocab, merges = mf.train_bpe()
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)  # <|endoftext|> = 400
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS])
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.model_max_length = 32768
    for offset, t in enumerate(["<|endoftext|>"] + QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(t) == 400 + offset, t
    return tok


def token_ids(tok):
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [
        ("endoftext", "<|endoftext|>"), ("im_start", "<|im_start|>"), ("im_end", "<|im_end|>"),
        ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>"), ("vision_pad", "<|vision_pad|>"),
        ("image_pad", "<|image_pad|>"), ("video_pad", "<|video_pad|>")]}
    return ids


# ------------------------------------------------------------------------------------------------
# Input images and video frames
# ------------------------------------------------------------------------------------------------

# name -> (width, height); every file is tests/fixtures/images/<name>.png
QWEN_IMAGES = {
    "qwen-140x84": (140, 84),      # Qwen2.5 single: 84x140 -> grid (1,6,10), llm 3x5, 6 windows
    "qwen-160x96": (160, 96),      # Qwen3 single: grid (1,6,10)
    "qwen-tall-50x150": (50, 150),  # two_images: Qwen2.5 -> 140x56 (1,10,4); Qwen3 -> 160x64 (1,10,4)
    "qwen-wide-200x45": (200, 45),  # two_images: Qwen2.5 -> 56x196 (1,4,14); Qwen3 -> 32x192 (1,2,12)
    "qwen-56x56": (56, 56),        # batch row 0: Qwen2.5 (1,4,4): one window + all-padding windows
    "qwen-84x56": (84, 56),        # batch row 1
    "qwen-64x64": (64, 64),        # Qwen3 image_video: (1,4,4)
    # processor-only cases
    "qwen-tiny-10x10": (10, 10),   # upscaled by min_pixels
    "qwen-tall-30x200": (30, 200),
    "qwen-wide-300x41": (300, 41),
    "qwen-big-320x240": (320, 240),  # over max_pixels for both families: scaled down
    "qwen-half-98x70": (98, 70),   # 70/28 = 2.5 -> 2, 98/28 = 3.5 -> 4 (round half to even)
    "qwen-half-112x80": (112, 80),  # 80/32 = 2.5 -> 2, 112/32 = 3.5 -> 4
}
VIDEO_FRAMES = 5
VIDEO_SIZE = (84, 56)  # width, height of each frame


def write_qwen_images(images_dir):
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, (w, h)) in enumerate(QWEN_IMAGES.items()):
        mf.test_image(w, h, mf.SEED + 1000 + i).save(images_dir / f"{name}.png")
    video_dir = images_dir / "video"
    video_dir.mkdir(parents=True, exist_ok=True)
    for k in range(VIDEO_FRAMES):
        frame = numpy.array(mf.test_image(*VIDEO_SIZE, mf.SEED + 1100 + k))
        frame = numpy.roll(frame, 7 * k, axis=1)  # something moves
        Image.fromarray(frame, "RGB").save(video_dir / f"frame_{k:03d}.png")


def load_image(images_dir, name):
    return Image.open(images_dir / f"{name}.png")


def load_video(images_dir):
    return [Image.open(images_dir / "video" / f"frame_{k:03d}.png") for k in range(VIDEO_FRAMES)]


# ------------------------------------------------------------------------------------------------
# Processors and their files
# ------------------------------------------------------------------------------------------------

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MEAN_STD = {"qwen2_5": (CLIP_MEAN, CLIP_STD), "qwen3": ([0.5] * 3, [0.5] * 3)}
QWEN2_5_PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 32)
QWEN3_IMAGE_SIZE = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 32}
QWEN3_VIDEO_SIZE = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 32}


def qwen2_5_processor(tok):
    image = Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN,
                                  image_std=CLIP_STD, **QWEN2_5_PIXELS)
    video = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN,
                                  image_std=CLIP_STD, **QWEN2_5_PIXELS)
    return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                               chat_template=QWEN2_5_VL_CHAT_TEMPLATE)


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def hub_preprocessor_config(family):
    """preprocessor_config.json as the hub repos spell it (flat)."""
    if family == "qwen2_5":
        return {
            "min_pixels": QWEN2_5_PIXELS["min_pixels"], "max_pixels": QWEN2_5_PIXELS["max_pixels"],
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        }
    return {
        "size": dict(QWEN3_IMAGE_SIZE), "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
    }


def hub_video_preprocessor_config(family):
    if family == "qwen2_5":
        return {
            "min_pixels": QWEN2_5_PIXELS["min_pixels"], "max_pixels": QWEN2_5_PIXELS["max_pixels"],
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
        }
    return {
        "size": dict(QWEN3_VIDEO_SIZE), "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "fps": 2, "min_frames": 4,
        "max_frames": 768, "do_sample_frames": True,
        "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
    }


def write_hub_processor_files(model_dir, tok, family, template, video_config=True):
    """tokenizer.json + tokenizer_config.json (with the template inside, as the hub files have it),
    chat_template.json, flat preprocessor_config.json and (optionally) video_preprocessor_config.json."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(model_dir)
    processor_class = "Qwen2_5_VLProcessor" if family == "qwen2_5" else "Qwen3VLProcessor"
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = template
    tok_config["processor_class"] = processor_class
    write_json(model_dir / "tokenizer_config.json", tok_config)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    write_json(model_dir / "chat_template.json", {"chat_template": template})
    write_json(model_dir / "preprocessor_config.json", hub_preprocessor_config(family))
    if video_config:
        write_json(model_dir / "video_preprocessor_config.json", hub_video_preprocessor_config(family))


def write_generation_config(model_dir, ids):
    GenerationConfig(bos_token_id=ids["endoftext"], pad_token_id=ids["endoftext"],
                     eos_token_id=[ids["im_end"], ids["endoftext"]], do_sample=False).save_pretrained(model_dir)


def load_processor(model_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return AutoProcessor.from_pretrained(model_dir)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def qwen2_5_config(tok, tied):
    """The tied variant also has a narrower vision tower (hidden 16, head_dim 8, MLP 32): other dims, less data."""
    ids = token_ids(tok)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=16 if tied else 32, intermediate_size=32 if tied else 48,
                           num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
                           out_hidden_size=64, tokens_per_second=2, hidden_act="silu"),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         hidden_act="silu", bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=tied,
    )
    config._attn_implementation = "eager"
    return config


QWEN3_VOCAB = 432  # padded past the 426 tokenizer entries, like the real checkpoints


def qwen3_config(tok):
    ids = token_ids(tok)
    config = Qwen3VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 2], out_hidden_size=64, hidden_act="gelu_pytorch_tanh"),
        text_config=dict(vocab_size=QWEN3_VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                         max_position_embeddings=4096, hidden_act="silu", attention_bias=False,
                         bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"],
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [6, 5, 5], "mrope_interleaved": True}),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    return config


def rerandomise_qwen(model, seed, tokenizer_size):
    """make_fixtures.rerandomise, then: the Qwen2.5 merger's RMSNorm weight `ln_q` (no "norm" in its name) gets
    1 + 0.2 N like every other norm weight; Qwen3's learned position grid gets 0.5 N (so the interpolation matters).
    Tied models: the embedding gets 0.08 N and the final norm weight 10 (1 + 0.2 N): a tied head over a small
    embedding gives flat logits (margins < 0.05), a larger embedding makes greedy decoding echo one token.
    Embedding rows past the tokenizer (vocab padding) are scaled by 0.1, like the untrained rows of real checkpoints,
    so greedy decoding does not pick ids the tokenizer cannot decode."""
    mf.rerandomise(model, seed)
    gen = torch.Generator().manual_seed(seed + 7919)
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("merger.ln_q.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("visual.pos_embed.weight"):
                p.copy_(0.5 * noise)
            elif tied and name.endswith("embed_tokens.weight"):
                p.copy_(0.08 * noise)
            elif tied and name == "model.language_model.norm.weight":
                p.copy_(10.0 * (1.0 + 0.2 * noise))
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                p[tokenizer_size:] *= 0.1


def build_qwen2_5(tok, tied):
    model = Qwen2_5_VLForConditionalGeneration(qwen2_5_config(tok, tied))
    model.eval()
    return model


def build_qwen3(tok):
    model = Qwen3VLForConditionalGeneration(qwen3_config(tok))
    model.eval()
    return model


# ------------------------------------------------------------------------------------------------
# Prompts ("cases") and the reference activations of one case
# ------------------------------------------------------------------------------------------------

def image_part(name):
    return {"type": "image", "image": f"{name}.png"}


def text_part(text):
    return {"type": "text", "text": text}


def case_specs(family, variant):
    """name -> dict(messages=[...] per batch row, video_fps=...). Images are referenced by file name
    (tests/fixtures/images/); {"type": "video"} is the 5-frame clip in tests/fixtures/images/video/."""
    single_image = "qwen-140x84" if family == "qwen2_5" else "qwen-160x96"
    fps = 1.5 if variant == "tied" else (4 if family == "qwen2_5" else 2)
    system = "Answer briefly." if family == "qwen2_5" else "You are a helpful assistant."
    specs = {
        "single": dict(rows=[[{"role": "user", "content": [image_part(single_image),
                                                            text_part("What is in this image?")]}]]),
        "two_images": dict(rows=[[
            {"role": "system", "content": [text_part(system)]},
            {"role": "user", "content": [image_part("qwen-tall-50x150"), image_part("qwen-wide-200x45"),
                                         text_part("Compare the two pictures.")]}]]),
        "batch": dict(rows=[
            [{"role": "user", "content": [image_part("qwen-56x56"), text_part("Color?")]}],
            [{"role": "user", "content": [image_part("qwen-84x56"),
                                          text_part("Describe the picture in detail. How many people are there?")]}],
        ]),
        "video": dict(rows=[[{"role": "user", "content": [{"type": "video", "video": "video/frame_*.png"},
                                                           text_part("What happens in the video?")]}]],
                      video_fps=fps),
    }
    if family == "qwen3":
        specs["image_video"] = dict(rows=[[{"role": "user", "content": [
            image_part("qwen-64x64"), {"type": "video", "video": "video/frame_*.png"},
            text_part("Is the picture in the video?")]}]], video_fps=fps)
    if variant == "tied":
        specs = {k: specs[k] for k in ("single", "video")}
    return specs


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


def process_case(processor, images_dir, spec):
    """Render each row with the chat template, then run the processor on the batch (left padding)."""
    prompts, images, videos, metadata = [], [], [], []
    for messages in spec["rows"]:
        prompts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        for message in messages:
            for part in message["content"]:
                if part["type"] == "image":
                    images.append(load_image(images_dir, part["image"][:-len(".png")]))
                elif part["type"] == "video":
                    videos.append(load_video(images_dir))
                    metadata.append(VideoMetadata(total_num_frames=VIDEO_FRAMES, fps=spec["video_fps"],
                                                  frames_indices=list(range(VIDEO_FRAMES))))
    kwargs = dict(text=prompts, return_tensors="pt", padding=True, padding_side="left",
                  return_text_replacement_offsets=True)
    if images:
        kwargs["images"] = images
    if videos:
        kwargs.update(videos=videos, video_metadata=metadata, do_sample_frames=False)
    inputs = processor(**kwargs)
    offsets = inputs.pop("text_replacement_offsets")
    expanded = [expand(p, o) for p, o in zip(prompts, offsets)]
    tok = processor.tokenizer
    for row, text in enumerate(expanded):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, "expanded prompt does not re-tokenize"
    info = {
        "messages": spec["rows"] if len(spec["rows"]) > 1 else spec["rows"][0],
        "prompt": prompts if len(prompts) > 1 else prompts[0],
        "prompt_expanded": expanded if len(expanded) > 1 else expanded[0],
        "images": [{"file": f"images/{img.filename.rsplit('/', 1)[-1]}", "width": img.size[0],
                    "height": img.size[1]} for img in images],
    }
    if videos:
        info["video"] = {"frames": [f"images/video/frame_{k:03d}.png" for k in range(VIDEO_FRAMES)],
                         "width": VIDEO_SIZE[0], "height": VIDEO_SIZE[1],
                         "video_metadata": {"total_num_frames": VIDEO_FRAMES, "fps": spec["video_fps"],
                                            "frames_indices": list(range(VIDEO_FRAMES))},
                         "do_sample_frames": False}
    return inputs, info


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

    model.model.rope_deltas = None
    lm.forward = forward
    try:
        out = model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    finally:
        del lm.forward
    model.model.rope_deltas = None
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    step_logits = torch.stack([l.float() for l in out.logits], dim=1)  # [B, steps, V]
    return tokens, step_logits, calls


@torch.no_grad()
def reference_case(model, inputs, family, pad_id, full_logits):
    """All reference tensors of one case (names without the case prefix) and the greedy margins."""
    t = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw"):
        if key in inputs:
            t[key] = inputs[key].to(torch.int64).contiguous()
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:  # stored as the uint8 levels (exact, a quarter of the size)
            t[f"{key}_u8"] = to_u8_levels(inputs[key].float(), *MEAN_STD[family])
    if "second_per_grid_ts" in inputs:
        t["second_per_grid_ts"] = torch.as_tensor(inputs["second_per_grid_ts"]).float().contiguous()

    rope_kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")
                   if k in inputs}
    position_ids, rope_deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                           **rope_kwargs)
    t["position_ids"] = position_ids.contiguous()
    t["rope_deltas"] = rope_deltas.to(torch.int64).reshape(-1, 1).contiguous()

    visual = model.model.visual
    merge = model.config.vision_config.spatial_merge_size
    for kind, pv_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
        if pv_key not in inputs:
            continue
        out = visual(inputs[pv_key].float(), grid_thw=inputs[grid_key])
        if family == "qwen2_5":
            vc = model.config.vision_config
            window_index, cu_window = get_vision_window_index(inputs[grid_key], spatial_merge_size=merge,
                                                              window_size=vc.window_size, patch_size=vc.patch_size)
            prefix = "" if kind == "image" else "video_"
            t[f"{prefix}vision_hidden"] = out.last_hidden_state.contiguous()
            t[f"{prefix}window_index"] = window_index.to(torch.int64).contiguous()
            t[f"{prefix}cu_window_seqlens"] = torch.as_tensor(cu_window).to(torch.int64).contiguous()
        else:
            for k, feature in enumerate(out.deepstack_features):
                t[f"{'' if kind == 'image' else 'video_'}deepstack_{k}"] = feature.contiguous()
        t[f"{kind}_embeds"] = out.pooler_output.contiguous()

    model.model.rope_deltas = None
    logits = model(**inputs).logits.float()
    model.model.rope_deltas = None
    if full_logits:
        t["logits"] = logits.contiguous()
    else:  # (size) the batch, two_images and image_video cases keep the last position only
        t["last_logits"] = logits[:, -1].contiguous()

    tokens, step_logits, calls = generate_traced(model, inputs, pad_id)
    assert torch.equal(step_logits.argmax(-1), tokens)
    assert (step_logits[:, 0] - logits[:, -1]).abs().max() < 1e-4
    assert len(calls) == GREEDY_TOKENS and calls[0].shape[0] == 4
    assert torch.equal(calls[0][1:], position_ids), "generate's prompt positions differ from get_rope_index"
    last = position_ids[:, :, -1]  # [3, B]: the last prompt token is text, all rows equal
    decode = torch.stack([c[1:, :, -1] for c in calls[1:]])  # [steps - 1, 3, B]
    for step in range(GREEDY_TOKENS - 1):
        assert torch.equal(decode[step], last + 1 + step), "decode positions are not last + 1 + step"
    t["greedy_tokens"] = tokens.to(torch.int64).contiguous()
    t["greedy_step_logits"] = step_logits.contiguous()
    t["decode_position_ids"] = decode.to(torch.int64).contiguous()
    return t, top2_margins(step_logits)


def acceptable(tensors, margins, vocab_in_tokenizer, eos_ids, min_distinct):
    if min(margins) < MIN_MARGIN:
        return False
    for row in tensors["greedy_tokens"].tolist():
        if len(set(row)) < min_distinct or any(tok in eos_ids or tok >= vocab_in_tokenizer for tok in row):
            return False
    return True


def seeded_qwen(build, first_seed, case_inputs, family, tok):
    """The first seed whose greedy decoding is unambiguous in every case (each top-1/top-2 gap >= 0.05 in f32 and
    with the weights rounded to bf16), not constant (>= 3 distinct tokens in the single-image case, >= 2 in every
    other row; tiny random decoders fall into repeats easily, and every step's logits are stored anyway) and free
    of eos / out-of-tokenizer tokens. Returns (model, seed, {case: tensors}, {case: margins})."""
    ids = token_ids(tok)
    eos_ids = {ids["im_end"], ids["endoftext"]}
    for seed in range(first_seed, first_seed + 100):
        model = build()
        rerandomise_qwen(model, seed, len(tok))
        rounded = mf.rounded_to_bf16(model)
        results, margins, ok = {}, {}, True
        for name, inputs in case_inputs.items():
            full = name in ("single", "video")
            tensors, m = reference_case(model, inputs, family, ids["endoftext"], full)
            _, m16 = reference_case(rounded, inputs, family, ids["endoftext"], full)
            if not acceptable(tensors, m + m16, len(tok), eos_ids, 3 if name == "single" else 2):
                ok = False
                break
            results[name], margins[name] = tensors, m
        if ok:
            return model, seed, results, margins
        print(f"    seed {seed} rejected ({name})")
    raise SystemExit("no seed gave unambiguous greedy tokens")


# ------------------------------------------------------------------------------------------------
# Checkpoint writers
# ------------------------------------------------------------------------------------------------

def qwen2_5_hub_config(model, tok):
    """config.json as the hub has it for Qwen2.5-VL (written by transformers 4.4x): text keys flat at the top
    level, rope_scaling {"type": "mrope"} + rope_theta, torch_dtype, vision in_chans / spatial_patch_size."""
    c, v, t = model.config, model.config.vision_config, model.config.text_config
    ids = token_ids(tok)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["endoftext"],
        "eos_token_id": ids["im_end"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
        "vision_token_id": ids["vision_pad"],
        "image_token_id": ids["image_pad"],
        "video_token_id": ids["video_pad"],
        "hidden_act": t.hidden_act,
        "hidden_size": t.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_parameters["rope_theta"],
        "sliding_window": 4096,
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "torch_dtype": "float32",
        "transformers_version": "4.49.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": v.depth,
            "hidden_act": v.hidden_act,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": 3,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "spatial_patch_size": v.patch_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
            "temporal_patch_size": v.temporal_patch_size,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.rope_parameters["mrope_section"])},
        "vocab_size": t.vocab_size,
    }


def qwen3_hub_config(model, tok):
    """config.json as the hub has it for Qwen3-VL-*-Instruct (written by transformers 4.57): nested, with
    text_config.rope_scaling (+ mrope_interleaved) and text_config.rope_theta, dtype, tie both places."""
    c, v, t = model.config, model.config.vision_config, model.config.text_config
    ids = token_ids(tok)
    rope = t.rope_parameters
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "dtype": "float32",
        "image_token_id": ids["image_pad"],
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["endoftext"],
            "dtype": "float32",
            "eos_token_id": ids["im_end"],
            "head_dim": t.head_dim,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "model_type": "qwen3_vl_text",
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": list(rope["mrope_section"]),
                             "rope_type": "default"},
            "rope_theta": rope["rope_theta"],
            "tie_word_embeddings": True,
            "use_cache": True,
            "vocab_size": t.vocab_size,
        },
        "tie_word_embeddings": True,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": ids["video_pad"],
        "vision_config": {
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "depth": v.depth,
            "hidden_act": v.hidden_act,
            "hidden_size": v.hidden_size,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": v.intermediate_size,
            "model_type": "qwen3_vl",
            "num_heads": v.num_heads,
            "num_position_embeddings": v.num_position_embeddings,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
        },
        "vision_end_token_id": ids["vision_end"],
        "vision_start_token_id": ids["vision_start"],
    }


def legacy_qwen2_5_state_dict(model):
    """transformers-5 in-memory names -> the hub's (transformers-4) names."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = "visual." + key[len("model.visual."):]
        elif key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[key] = value.detach().contiguous().clone()
    return out


def save_weights(state, model_dir):
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def save_qwen2_5_hub(model, model_dir, tok, video_config=True):
    save_weights(legacy_qwen2_5_state_dict(model), model_dir)
    write_json(model_dir / "config.json", qwen2_5_hub_config(model, tok))
    write_hub_processor_files(model_dir, tok, "qwen2_5", QWEN2_5_VL_CHAT_TEMPLATE, video_config=video_config)
    write_generation_config(model_dir, token_ids(tok))


def save_qwen2_5_hf5(model, model_dir, tok):
    """What transformers 5 writes with save_original_format=False, processor files from processor.save_pretrained,
    plus the flat image / video preprocessor configs the hub repos have."""
    model.save_pretrained(model_dir, save_original_format=False)
    processor = qwen2_5_processor(tok)
    processor.save_pretrained(model_dir)
    processor.image_processor.save_pretrained(model_dir)
    processor.video_processor.save_pretrained(model_dir)
    write_generation_config(model_dir, token_ids(tok))


def save_qwen3_hub(model, model_dir, tok):
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_weights(state, model_dir)
    write_json(model_dir / "config.json", qwen3_hub_config(model, tok))
    write_hub_processor_files(model_dir, tok, "qwen3", QWEN3_VL_CHAT_TEMPLATE)
    write_generation_config(model_dir, token_ids(tok))


@torch.no_grad()
def check_saved(model_dir, cls, family, images_dir, specs, reference):
    """Reload checkpoint + processor from the directory and reproduce the references' inputs and logits."""
    processor = load_processor(model_dir)
    model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    for name, spec in specs.items():
        inputs, _ = process_case(processor, images_dir, spec)
        ref = reference[name]
        assert torch.equal(inputs["input_ids"], ref["input_ids"]), (model_dir, name)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                assert torch.equal(to_u8_levels(inputs[key].float(), *MEAN_STD[family]), ref[f"{key}_u8"]), key
        model.model.rope_deltas = None
        logits = model(**inputs).logits.float()
        model.model.rope_deltas = None
        expected = ref["logits"] if "logits" in ref else ref["last_logits"]
        got = logits if "logits" in ref else logits[:, -1]
        assert (got - expected).abs().max() < 1e-5, (model_dir, name, (got - expected).abs().max())
    print(f"  checked {model_dir.name}: reloads and reproduces {list(specs)}")


# ------------------------------------------------------------------------------------------------
# Reference files
# ------------------------------------------------------------------------------------------------

TENSOR_NOTES = {
    "pixel_values_u8": "[N, 3*2*P*P] uint8 levels in the processor's row / element order; the model input is "
                       "(f32(u8) - f32(f32(mean) * 255)) / f32(f32(std) * 255), bit-exactly what the processor gave "
                       "(mean/std: Qwen2.5 OPENAI_CLIP, Qwen3 0.5)",
    "pixel_values_videos_u8": "as pixel_values_u8, for the video",
    "vision_hidden": "vision tower after the last block, before the merger, rows in WINDOW order: "
                     "vision_hidden.reshape(N/4, 4, C)[i] belongs to merge unit window_index[i] (processor order)",
    "video_vision_hidden": "as vision_hidden, for the video",
    "window_index": "get_vision_window_index: merged-token permutation into window order",
    "cu_window_seqlens": "window boundaries in patches, zero-length windows removed",
    "image_embeds": "vision tower output (merger), image-pad order",
    "video_embeds": "vision tower output (merger), video-pad order",
    "position_ids": "[3, B, L] model.model.get_rope_index(...)[0]; 0 at padding",
    "rope_deltas": "[B, 1] get_rope_index(...)[1] = max position + 1 - unpadded length",
    "greedy_step_logits": "[B, steps, V] logits of every greedy step (step 0 = last prompt position), KV cache",
    "decode_position_ids": "[steps-1, 3, B] M-RoPE rows of the decode forwards of generate (token of step s "
                           "fed at step s+1)",
    "logits": "[B, L, V] prompt logits (single and video cases)",
    "last_logits": "[B, V] prompt logits at the last position (batch, two_images, image_video cases)",
    "greedy_margins": "(JSON) top-1 minus top-2 logit of every greedy step, row-major over [B, steps]",
}


def write_qwen_reference(out_dir, name, results, margins, infos, notes):
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
        "computed": "float32, eager attention, transformers' own processor (AutoProcessor, torchvision backend) "
                    "and model; greedy = generate(do_sample=False, max_new_tokens=8, eos_token_id=None)",
        "tensor_notes": TENSOR_NOTES,
        "cases": cases,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    write_json(ref_dir / f"{name}.json", meta)
    summary = {case: t["greedy_tokens"].tolist() for case, t in results.items()}
    print(f"  {name}: min greedy margin {min(all_margins):.3f}, tokens {summary}")


# ------------------------------------------------------------------------------------------------
# Fixture groups
# ------------------------------------------------------------------------------------------------

def case_inputs_for(tok, family, variant, images_dir):
    """The processor of the checkpoint (hub files written to a scratch directory, loaded back with AutoProcessor)
    run on every case of the family."""
    template = QWEN2_5_VL_CHAT_TEMPLATE if family == "qwen2_5" else QWEN3_VL_CHAT_TEMPLATE
    with tempfile.TemporaryDirectory() as tmp:
        write_hub_processor_files(Path(tmp), tok, family, template, video_config=variant != "tied")
        processor = load_processor(tmp)
    specs = case_specs(family, variant)
    inputs, infos = {}, {}
    for case, spec in specs.items():
        inputs[case], infos[case] = process_case(processor, images_dir, spec)
    return specs, inputs, infos


def describe_model(model):
    c = model.config
    return {"text_config": {k: v for k, v in c.text_config.to_dict().items()
                            if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                     "rope_parameters")},
            "vision_config": {k: v for k, v in c.vision_config.to_dict().items()
                              if k in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                                       "window_size", "fullatt_block_indexes", "tokens_per_second",
                                       "num_position_embeddings", "deepstack_visual_indexes", "out_hidden_size",
                                       "hidden_act")},
            "tie_word_embeddings": bool(c.tie_word_embeddings)}


def finish_infos(infos, results, tok):
    for case, info in infos.items():
        info["greedy_text"] = [tok.decode(row) for row in results[case]["greedy_tokens"].tolist()]


def make_qwen2_5_vl(out_dir):
    images_dir = out_dir / "images"
    write_qwen_images(images_dir)
    tok = build_qwen_tokenizer()
    models_dir = out_dir / "models"
    for variant, name, first_seed, checkpoints in (
        ("main", "qwen2_5-vl", mf.SEED + 2000, ["qwen2_5-vl", "qwen2_5-vl-hf5"]),
        ("tied", "qwen2_5-vl-tied", mf.SEED + 2100, ["qwen2_5-vl-tied"]),
    ):
        specs, inputs, infos = case_inputs_for(tok, "qwen2_5", variant, images_dir)
        model, seed, results, margins = seeded_qwen(lambda: build_qwen2_5(tok, variant == "tied"), first_seed,
                                                    inputs, "qwen2_5", tok)
        finish_infos(infos, results, tok)
        notes = {"family": "Qwen2_5_VLForConditionalGeneration", "seed": seed, "checkpoints": checkpoints,
                 "model": describe_model(model),
                 "vision_hidden_order": "window order (the tower permutes merge units by window_index before block 0 "
                                        "and un-permutes only after the merger)"}
        write_qwen_reference(out_dir, name, results, margins, infos, notes)
        if variant == "main":
            save_qwen2_5_hub(model, models_dir / "qwen2_5-vl", tok)
            save_qwen2_5_hf5(model, models_dir / "qwen2_5-vl-hf5", tok)
        else:
            save_qwen2_5_hub(model, models_dir / "qwen2_5-vl-tied", tok, video_config=False)
        for checkpoint in checkpoints:
            check_saved(models_dir / checkpoint, Qwen2_5_VLForConditionalGeneration, "qwen2_5", images_dir, specs,
                        results)


def make_qwen3_vl(out_dir):
    images_dir = out_dir / "images"
    write_qwen_images(images_dir)
    tok = build_qwen_tokenizer()
    specs, inputs, infos = case_inputs_for(tok, "qwen3", "main", images_dir)
    model, seed, results, margins = seeded_qwen(lambda: build_qwen3(tok), mf.SEED + 2200, inputs, "qwen3", tok)
    finish_infos(infos, results, tok)
    notes = {"family": "Qwen3VLForConditionalGeneration", "seed": seed, "checkpoints": ["qwen3-vl"],
             "model": describe_model(model),
             "deepstack": "deepstack_k = deepstack_merger_list[k](output of vision block deepstack_visual_indexes[k]); "
                          "added to the output of decoder layer k at the image/video-pad rows"}
    write_qwen_reference(out_dir, "qwen3-vl", results, margins, infos, notes)
    save_qwen3_hub(model, out_dir / "models" / "qwen3-vl", tok)
    check_saved(out_dir / "models" / "qwen3-vl", Qwen3VLForConditionalGeneration, "qwen3", images_dir, specs,
                results)


# ------------------------------------------------------------------------------------------------
# Processor references
# ------------------------------------------------------------------------------------------------

PROCESSOR_IMAGES = ["qwen-tiny-10x10", "qwen-tall-30x200", "qwen-wide-300x41", "qwen-big-320x240",
                    "qwen-half-98x70", "qwen-half-112x80", "alpha"]

# (height, width, factor, min_pixels, max_pixels): spec section 7.2 plus edge cases; the fixtures' own budgets too.
IMAGE_RESIZE_CASES = [
    (42, 42, 28, 3136, 12845056), (70, 70, 28, 3136, 12845056), (98, 126, 28, 3136, 12845056),
    (480, 640, 28, 3136, 12845056), (10, 2000, 28, 3136, 12845056), (1080, 1920, 28, 3136, 12845056),
    (4000, 3000, 28, 3136, 12845056), (14, 14, 28, 3136, 12845056), (1, 1, 28, 3136, 12845056),
    (10, 10, 28, 3136, 50176), (150, 50, 28, 3136, 50176), (45, 200, 28, 3136, 50176), (240, 320, 28, 3136, 50176),
    (70, 98, 28, 3136, 50176), (200, 30, 28, 3136, 50176), (41, 300, 28, 3136, 50176),
    (720, 1280, 32, 65536, 16777216), (480, 640, 32, 65536, 16777216), (100, 100, 32, 65536, 16777216),
    (80, 112, 32, 1024, 65536), (240, 320, 32, 1024, 65536), (10, 10, 32, 1024, 65536), (45, 200, 32, 1024, 65536),
    (1, 250, 28, 3136, 12845056), (1, 201, 28, 3136, 12845056), (1, 200, 28, 3136, 12845056),
    (3000, 14, 28, 3136, 12845056),
]
# (num_frames, height, width, temporal_factor, factor, min_pixels, max_pixels): Qwen3 video (whole-clip budget)
VIDEO_RESIZE_CASES = [
    (32, 720, 1280, 2, 32, 4096, 25165824), (4, 720, 1280, 2, 32, 4096, 25165824),
    (5, 56, 84, 2, 32, 4096, 65536), (2, 20, 100, 2, 32, 4096, 65536), (3, 480, 640, 2, 32, 4096, 65536),
    (768, 480, 640, 2, 32, 4096, 25165824), (5, 10, 10, 2, 32, 131072, 786432), (1, 64, 64, 2, 32, 4096, 65536),
    (9, 100, 3000, 2, 32, 4096, 25165824),
]


def to_u8_levels(pixel_values, mean, std):
    """Undo the processor's fused normalisation; assert the uint8 levels reproduce the floats exactly."""
    mean255 = torch.tensor(mean, dtype=torch.float32) * 255.0
    std255 = torch.tensor(std, dtype=torch.float32) * 255.0
    n = pixel_values.shape[0]
    pv = pixel_values.reshape(n, 3, -1)
    levels = (pv * std255.view(1, 3, 1) + mean255.view(1, 3, 1)).round().clamp(0, 255)
    again = (levels - mean255.view(1, 3, 1)) / std255.view(1, 3, 1)
    assert torch.equal(again, pv), "pixel values are not (u8 - mean*255) / (std*255) in float32"
    return levels.to(torch.uint8).reshape(pixel_values.shape).contiguous()


def resize_case(fn, args):
    try:
        return {"result": list(fn(*args))}
    except ValueError as error:
        return {"error": str(error)}


def write_qwen_processor_fixtures(out_dir):
    images_dir = out_dir / "images"
    write_qwen_images(images_dir)
    tok = build_qwen_tokenizer()
    proc_dir = out_dir / "processor"
    proc_dir.mkdir(parents=True, exist_ok=True)
    for old in proc_dir.glob("qwen-*"):
        old.unlink()
    processors = {}
    for family, template in (("qwen2_5", QWEN2_5_VL_CHAT_TEMPLATE), ("qwen3", QWEN3_VL_CHAT_TEMPLATE)):
        with tempfile.TemporaryDirectory() as tmp:
            write_hub_processor_files(Path(tmp), tok, family, template)
            processors[family] = load_processor(tmp)
    cases = []
    for name in PROCESSOR_IMAGES:
        image = Image.open(images_dir / f"{name}.png")
        messages = [{"role": "user", "content": [image_part(name), text_part("Describe it.")]}]
        tensors, entry = {}, {"name": name, "image": f"images/{name}.png", "width": image.size[0],
                              "height": image.size[1], "mode": image.mode, "messages": messages}
        for family, processor in processors.items():
            prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out = processor(text=[prompt], images=[image], return_tensors="pt")
            ip = processor.image_processor
            grid = out["image_grid_thw"]
            tensors[f"{family}.image_grid_thw"] = grid.to(torch.int64).contiguous()
            tensors[f"{family}.pixel_values_u8"] = to_u8_levels(out["pixel_values"], ip.image_mean, ip.image_std)
            tensors[f"{family}.input_ids"] = out["input_ids"][0].to(torch.int64).contiguous()
            patch = ip.patch_size
            entry[family] = {"resized_height": int(grid[0, 1]) * patch, "resized_width": int(grid[0, 2]) * patch,
                             "image_grid_thw": grid[0].tolist(), "prompt": prompt,
                             "image_tokens": int(grid[0].prod()) // ip.merge_size ** 2}
        save_file(tensors, str(proc_dir / f"{name if name.startswith('qwen-') else 'qwen-' + name}.safetensors"))
        entry["file"] = f"processor/{name if name.startswith('qwen-') else 'qwen-' + name}.safetensors"
        cases.append(entry)
        print(f"  processor {name}: qwen2_5 {entry['qwen2_5']['image_grid_thw']}, qwen3 {entry['qwen3']['image_grid_thw']}")
    index = {
        "processors": {
            "qwen2_5": {"checkpoint": "models/qwen2_5-vl", "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
                        "min_pixels": QWEN2_5_PIXELS["min_pixels"], "max_pixels": QWEN2_5_PIXELS["max_pixels"],
                        "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
            "qwen3": {"checkpoint": "models/qwen3-vl", "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
                      "size": QWEN3_IMAGE_SIZE, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        },
        "pixel_values": "pixel_values_u8 [N, 3*2*P*P] in the processor's row / element order; the processor's floats are "
                        "(f32(u8) - f32(f32(mean) * 255)) / f32(f32(std) * 255), bit-exactly",
        "resize": "torchvision antialiased bicubic on uint8 (PIL images converted to RGB first: alpha composited on white)",
        "cases": cases,
    }
    write_json(proc_dir / "qwen-cases.json", index)
    resize = {
        "image": {"function": "transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize(height, width, "
                              "factor, min_pixels, max_pixels)",
                  "cases": [{"args": list(args), **resize_case(image_smart_resize, args)}
                            for args in IMAGE_RESIZE_CASES]},
        "qwen3_video": {"function": "transformers.models.qwen3_vl.video_processing_qwen3_vl.smart_resize(num_frames, "
                                    "height, width, temporal_factor, factor, min_pixels, max_pixels)",
                        "cases": [{"args": list(args), **resize_case(qwen3_video_smart_resize, args)}
                                  for args in VIDEO_RESIZE_CASES]},
    }
    write_json(proc_dir / "qwen-smart-resize.json", resize)


GROUP_FUNCTIONS = {
    "qwen_vl_processor": write_qwen_processor_fixtures,
    "qwen2_5_vl": make_qwen2_5_vl,
    "qwen3_vl": make_qwen3_vl,
}


def make_group(group, out_dir):
    GROUP_FUNCTIONS[group](out_dir)
