"""Nemotron-H / Nemotron 3 Nano Omni parity fixtures, written by `make_fixtures.py --only GROUP` (this module is not a
script of its own; make_fixtures.py imports it when one of its groups runs).

    python3 scripts/make_fixtures.py --only nemotron_h,nemotron_omni   # ~8 s wall on 2 cores (mostly imports), ~4 MB

Groups: nemotron_h, nemotron_omni. Each rewrites only its own files (make_fixtures.GROUP_FILES); nemotron_omni also
(re)writes its input images tests/fixtures/images/nemotron-*.png (deterministic: same bytes every run; a rerun rewrites
every file byte-identically). Everything is computed in float32 with transformers itself: eager attention, the PyTorch
Mamba-2 path (chunked scan for prompts, the recurrent update for one-token decode steps; mamba_ssm / causal_conv1d are
not installed), the eager per-expert MoE loop. Every checkpoint is reloaded with `from_pretrained` (the omni processor
with `AutoProcessor`) and checked to reproduce the references. Both groups are also checked against an independent
plain-torch implementation written from the spec (`IndependentDecoder`, `independent_vision`: Mamba-2 as a
token-by-token recurrence, the router, RADIO with a hand-written bilinear resize, the pixel shuffle as explicit
indexing, the projector): it reproduces every reference (logits within 6e-5, vision within 3e-6); its numbers are in
the JSON ("independent_check"). Seeds are searched until every greedy step has a top-1/top-2 gap >= 0.05 in f32 and
with the weights rounded to bf16, no greedy token is a control token or a vocab-padding row, and every MoE selection
(group choice and expert choice, prompt and decode, real tokens) has a gap >= 2e-4. The spec these follow:
/work/notes/nemotron-omni-spec.md (not in the repository).

Tokenizer (both groups; tokenizer.json + tokenizer_config.json with the chat template inside, PreTrainedTokenizerFast,
like the real checkpoints)
    tekken-style byte-level BPE as in the pixtral fixture: 32 control tokens at ids 0..31, then the 400-piece BPE of the
    other fixtures at 32..431 (432 entries). Named controls: <unk> 0, <s> 1, </s> 2, <|im_start|> 10, <|im_end|> 11,
    <think> 12, </think> 13, <image> 18 (the image-context token; the real img_context_token_id is 18), <img> 19,
    </img> 20, <video> 21, <so_embedding> 27, <so_start> 28, <so_end> 29; the rest <SPECIAL_k>. Only <image> = 18 is
    sourced from a published config; the other ids only mirror the tekken layout. Neither the tokenizer nor the template
    adds a BOS. pad = <unk> (0). Config vocab_size 448 (padded to a multiple of 64): rows 432..447 of embeddings /
    lm_head are scaled by 0.1 and never generated.
    Chat template: NOT the real one (it could not be obtained); a minimal Nemotron-3-style ChatML rendering: always a
    system turn "<|im_start|>system\n{system or ''}<|im_end|>\n", then "<|im_start|>{role}\n{content}<|im_end|>\n" per
    turn (assistant content prefixed with "<think></think>" unless it has one), an image chunk renders "<image>\n", a
    text chunk its "text"; the generation prompt is "<|im_start|>assistant\n<think>\n" (enable_thinking, default true)
    or "<|im_start|>assistant\n<think></think>". generation_config.json: eos [2, 11], pad 0.

nemotron_h: tests/fixtures/models/nemotron-h, models/nemotron-h-hub, reference/nemotron-h.{safetensors,json}
    NemotronHForCausalLM (float32), hidden 64, 6 blocks, pattern "ME*M-E" = layers_block_type ["linear_attention",
    "moe", "full_attention", "linear_attention", "mlp", "moe"]:
      Mamba-2: mamba_num_heads 6 x mamba_head_dim 12 = 72 (!= expand * hidden = 128: `expand` is not used),
               n_groups 2 (3 heads per group), ssm_state_size 12, conv_kernel 4 (conv_dim 72 + 2*2*12 = 120, bias),
               chunk_size 8 (the 41-token prompt is 6 chunks, the last one padded), gated RMSNorm in groups of 36,
               eps 1e-5, in_proj 64 -> 198 (z 72 | xBC 120 | dt 6), no in/out_proj bias; time_step_min 0.02 and
               heads 1 and 4 of each Mamba layer with dt_bias ~ -4.6, so the prompt path's dt clamp (dt >=
               time_step_min, transformers 5 only) fires on ~25% of the prompt's dt values while one-token decode steps
               never clamp: ignoring the clamp moves the greedy step logits by ~1 (JSON "dt_clamp",
               "independent_check.step_logits_change_without_prompt_dt_clamp").
      attention: 4 heads x head_dim 24 (96 != 64), 2 KV heads, no positional encoding, no bias.
      MoE: 8 routed experts (up 64 -> 32, relu^2, down 32 -> 64), top-2, n_group 4 / topk_group 2 (grouped selection
           active), routed_scaling_factor 2.5, norm_topk_prob, random e_score_correction_bias, shared expert 64 -> 48
           -> 64.
      MLP ("-"): up 64 -> 96, relu^2, down. Untied lm_head. layer_norm_epsilon 1e-5.
    models/nemotron-h: `save_pretrained` output (hub names backbone.*, experts split per expert; config.json in the
    transformers-5 spelling: layers_block_type, "time_step_limit": [0.0, {"__float__": "Infinity"}], dtype).
    models/nemotron-h-hub: the same weights, config.json in the transformers-4 / remote-code spelling
    (hybrid_override_pattern "ME*M-E", num_hidden_layers, torch_dtype, rope_theta (unused), and "time_step_limit":
    [0.0, Infinity] with a bare non-JSON `Infinity`, as Python's json writes it).
    Cases:
      single  one 41-token prompt (chat template with generation prompt)
      batch   two prompts of 27 and 43 tokens, LEFT padded with 0, attention_mask (the padded row's last logits equal
              the same prompt run alone within ~1e-5: padding is neutral for Mamba, attention and MoE)
    Tensors (<case>.<name>): input_ids, attention_mask [B, L]; single only: embeddings [1, 41, 64], layer_outputs
    [6, 1, 41, 64] (raw output of every block, residual included, before norm_f), hidden_states [7, 1, 41, 64] (what
    transformers returns: embeddings, blocks 0..4, then norm_f(block 5): the LAST entry is normalised), logits
    [1, 41, 448]; batch only: last_logits [2, 448]; both: mamba_conv_state [B, 120, 4] and mamba_ssm_state
    [B, 6, 12, 12] (layer 0's cache after the prompt: the last 4 pre-conv xBC columns; the f32 SSM state [batch,
    heads, head_dim, d_state]), greedy_tokens [B, 8] (generate, do_sample=False, eos_token_id=None), greedy_step_logits
    [B, 8, 448] (step 0 = the prompt's last position; then one-token steps with the caches).

nemotron_omni: tests/fixtures/models/nemotron-omni, reference/nemotron-omni.{safetensors,json}, images/nemotron-*.png
    NemotronH_Omni_Reasoning_V3 (model_type nemotron_h_omni), `save_pretrained` output = the original hub layout:
    language_model.backbone.*, language_model.lm_head.weight, vision_model.radio_model.model.{patch_generator.*,
    blocks.N.*} with fused attn.qkv, vision_model.radio_model.summary_idxs, mlp1.{0,1,3}.weight; config.json as 5.24
    writes it (text_config / vision_config / layers_block_type). Processor files as processor.save_pretrained writes
    them (processor_config.json with image, video and audio sub-processors, chat_template.jinja) plus the flat
    preprocessor_config.json and a hub-style tokenizer_config.json with the chat template.
      RADIO: hidden 32, 3 blocks, 2 heads (16), mlp_ratio 2 (fc1 32 -> 64, gelu), LayerNorm eps 1e-6, qkv bias, layer
             scales (lambda1, random; the real checkpoint has none = identity), patch 16 (Linear over 768-wide
             channel-major patches, no bias), 2 CLS + 2 register tokens, max_img_size 96 -> 6 x 6 position table,
             video_temporal_patch_size 2 (video_embedder present, unused by images), summary_idxs [0, 1] (unused).
      pixel shuffle 0.5 -> 128 -> RMSNorm(eps 1e-5) -> Linear 128 -> 96 -> relu^2 -> Linear 96 -> 64, no biases.
      decoder: the nemotron_h dims and pattern (another seed); image_token_id 18; no audio tower (audio_config null).
      Processor: NemotronH_Omni_Reasoning_V3ImageProcessor, min_num_patches 8, max_num_patches 48 (real: 1024 /
      13312), max_model_len 16384, patch 16, downsample 0.5, CLIP mean/std, bicubic antialiased on float32 values.
    Cases:
      single      nemotron-200x90.png -> grid 4 x 10 (6 x 13 scaled by sqrt(48/78)); position table upsampled 6 -> 10
                  and cropped to 4 rows; 10 image tokens; 43-token prompt
      two_images  system message, then "Compare <112x112> with <40x70>, please." in one user turn:
                  nemotron-112x112.png -> 8 x 8 (112/16 = 7 -> round(7.5) = 8) scaled to 6 x 6 (table used as is),
                  9 tokens; nemotron-40x70.png -> 5 x 3 -> odd sides rounded up -> 6 x 4 (table cropped to 4
                  columns), 6 tokens; 64-token prompt
    Tensors (<case>.<name>): input_ids, attention_mask [1, L]; pixel_values [P, 768] float32 (the processor's output,
    not whole 0-255 levels: the resize runs on floats) and image_grid_hw [N, 2]; vision_hidden_states [4, S, 32]
    (index 0 = RADIO embeddings = input of block 0, images packed with their 4 prefix tokens each, S = sum(4 + gh*gw);
    index k = output of block k-1); vision_features [P, 32] (prefix tokens dropped); vision_shuffled [P/4, 128];
    image_features [P/4, 64] (projector output, scattered in order onto the <image> positions); logits [1, 43, 448]
    (single) / last_logits [1, 448] (two_images); greedy_tokens [1, 8]; greedy_step_logits [1, 8, 448].
    Processor-only (same file): processor_tiny_10x10 (-> 4 x 4: min_num_patches upscale), processor_wide_300x41
    (-> 2 x 18), processor_alpha_40x30 (RGBA composited on white, -> 4 x 4): <case>.pixel_values, <case>.image_grid_hw.
    The JSON also has the grid rule on many sizes at the fixture settings and at the real ones (one crashes
    transformers: a side floored to 0 patches -> ZeroDivisionError).
"""

import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

import make_fixtures as mf
import fixtures_llava as fl

GREEDY_TOKENS = mf.GREEDY_TOKENS
MIN_MARGIN = mf.NEW_MIN_MARGIN  # 0.05, in f32 and with the weights rounded to bf16, at every greedy step
MIN_ROUTER_GAP = 2e-4  # smallest accepted gap at every MoE selection boundary (group choice, expert choice), f32
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# ------------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ------------------------------------------------------------------------------------------------

NUM_SPECIALS = 32
NAMED_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 10: "<|im_start|>", 11: "<|im_end|>", 12: "<think>", 13: "</think>",
                  18: "<image>", 19: "<img>", 20: "</img>", 21: "<video>", 27: "<so_embedding>", 28: "<so_start>",
                  29: "<so_end>"}
SPECIALS = [NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(NUM_SPECIALS)]
PAD_ID = 0
TEXT_VOCAB = 448  # tokenizer 432 entries, padded to a multiple of 64

CHAT_TEMPLATE = (
    "{%- set enable_thinking = enable_thinking if enable_thinking is defined else true -%}"
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for chunk in content -%}"
    "{%- if chunk['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif chunk['type'] == 'text' -%}{{- chunk['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = render(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_message = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' -}}"
    "{%- for message in loop_messages -%}"
    "{%- set content = render(message['content']) -%}"
    "{%- if message['role'] == 'assistant' and '<think>' not in content -%}"
    "{%- set content = '<think></think>' + content -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if enable_thinking -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n<think></think>' -}}{%- endif -%}"
    "{%- endif -%}"
)


def build_tokenizer():
    """tekken-style tokenizer (see the module docstring), as a PreTrainedTokenizerFast with the chat template."""
    from transformers import PreTrainedTokenizerFast
    vocab, merges = mf.train_bpe()
    full = {token: i for i, token in enumerate(SPECIALS)}
    full.update({token: i + NUM_SPECIALS for token, i in vocab.items()})
    backend = Tokenizer(models.BPE(full, merges, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fl.TEKKEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                  unk_token="<unk>", pad_token="<unk>")
    for i, t in enumerate(SPECIALS):
        assert tok.convert_tokens_to_ids(t) == i, t
    assert len(tok) == NUM_SPECIALS + len(vocab) == 432
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 4096
    return tok


def check_raw_ids(tokenizer_json, text, ids):
    """tokenizer.json alone (the `tokenizers` library: what the Rust crate runs) gives transformers' ids."""
    raw = Tokenizer.from_file(str(tokenizer_json))
    assert raw.encode(text).ids == list(ids), ("tokenizer.json disagrees with transformers", text)


# ------------------------------------------------------------------------------------------------
# Configs and models
# ------------------------------------------------------------------------------------------------

PATTERN = "ME*M-E"
CLAMP_HEADS = (1, 4)  # per Mamba layer, heads whose dt_bias is pushed down so the prompt's dt clamp fires


def text_config_kwargs():
    """NemotronHConfig kwargs in the transformers-5 spelling."""
    return dict(
        vocab_size=TEXT_VOCAB, hidden_size=64, layers_block_type=[
            {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}[c] for c in PATTERN],
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, intermediate_size=96, mlp_hidden_act="relu2",
        ssm_state_size=12, mamba_num_heads=6, mamba_head_dim=12, n_groups=2, conv_kernel=4, expand=2, chunk_size=8,
        time_step_min=0.02, time_step_max=0.1, time_step_limit=[0.0, float("inf")], use_conv_bias=True, use_bias=False,
        mamba_hidden_act="silu", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, n_shared_experts=1, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
        pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=11, max_position_embeddings=4096,
        num_logits_to_keep=1,
    )


def hub_text_config(config):
    """config.json of a Nemotron-H checkpoint in the transformers-4 / remote-code spelling (nvidia's hub files:
    hybrid_override_pattern, mamba_* aliases, rope_theta present but unused, torch_dtype)."""
    c = config
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "hybrid_override_pattern": c.hybrid_override_pattern,
        "num_hidden_layers": len(c.layers_block_type),
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "attention_bias": False,
        "intermediate_size": c.intermediate_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "ssm_state_size": c.ssm_state_size,
        "mamba_num_heads": c.mamba_num_heads,
        "mamba_head_dim": c.mamba_head_dim,
        "n_groups": c.n_groups,
        "conv_kernel": c.conv_kernel,
        "expand": c.expand,
        "chunk_size": c.chunk_size,
        "mamba_hidden_act": "silu",
        "mamba_proj_bias": False,
        "use_conv_bias": True,
        "use_bias": False,
        "time_step_min": c.time_step_min,
        "time_step_max": c.time_step_max,
        "time_step_floor": c.time_step_floor,
        "time_step_limit": [0.0, float("inf")],
        "n_routed_experts": c.n_routed_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "moe_intermediate_size": c.moe_intermediate_size,
        "moe_shared_expert_intermediate_size": c.moe_shared_expert_intermediate_size,
        "moe_latent_size": None,
        "n_group": c.n_group,
        "topk_group": c.topk_group,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": c.routed_scaling_factor,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "residual_in_fp32": False,
        "rescale_prenorm_residual": True,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": 10000,
        "num_logits_to_keep": 1,
        "use_cache": True,
        "use_mamba_kernels": True,
        "tie_word_embeddings": False,
        "pad_token_id": PAD_ID,
        "bos_token_id": 1,
        "eos_token_id": 11,
        "torch_dtype": "float32",
        "transformers_version": "4.55.4",
    }


def build_text_model():
    from transformers import NemotronHConfig, NemotronHForCausalLM
    config = NemotronHConfig(**text_config_kwargs())
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = NemotronHForCausalLM(config)
    model.eval()
    return model


VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2.0, hidden_act="gelu",
              layer_norm_eps=1e-6, qkv_bias=True, patch_size=16, max_img_size=96, num_cls_tokens=2, num_registers=2,
              video_temporal_patch_size=2)


def build_omni_model():
    from transformers import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config
    config = NemotronH_Omni_Reasoning_V3_Config(
        vision_config=dict(VISION), text_config=text_config_kwargs(), audio_config=None, downsample_ratio=0.5,
        vision_hidden_size=VISION["hidden_size"], projector_hidden_size=96, image_token_id=18,
        video_temporal_patch_size=2)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    config.text_config._experts_implementation = "eager"
    model = NemotronH_Omni_Reasoning_V3(config)
    model.eval()
    return model


def rerandomise_nemotron(model, seed, tokenizer_size=432):
    """make_fixtures.rerandomise, then the parameters its generic rules get wrong or miss (all seeded):
    Mamba A_log = 0.5 N (A = -exp(A_log)), dt_bias = -2 + 0.7 N with CLAMP_HEADS at -4.6 + 0.3 N, D = 1 + 0.3 N;
    3-D expert weights by their per-expert fan-in; the router's e_score_correction_bias (a buffer) 0.2 N;
    RADIO position table and CLS/register tokens 0.5 N, layer scales 1 + 0.3 N. Embedding / lm_head rows past the
    tokenizer (vocab padding) are scaled by 0.1."""
    mf.rerandomise(model, seed)
    gen = torch.Generator().manual_seed(seed + 104729)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif leaf == "dt_bias":
                value = -2.0 + 0.7 * torch.randn(p.shape, generator=gen)
                for h in CLAMP_HEADS:
                    value[h] = -4.6 + 0.3 * torch.randn((), generator=gen)
                p.copy_(value)
            elif leaf == "D":
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("experts.up_proj") or name.endswith("experts.down_proj"):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            elif leaf in ("position_embedding", "cls_register_token"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif leaf == "lambda1":
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
        for name, p in model.named_parameters():
            if name.endswith("embeddings.weight") and "vision" not in name or name.endswith("lm_head.weight"):
                p[tokenizer_size:] *= 0.1


def rounded_to_bf16(model):
    """Parameters AND buffers (the router bias) rounded to bf16, kept in f32."""
    rounded = mf.rounded_to_bf16(model)
    with torch.no_grad():
        for name, b in rounded.named_buffers():
            if b.is_floating_point():
                b.copy_(b.to(torch.bfloat16).float())
    return rounded


# ------------------------------------------------------------------------------------------------
# Independent implementation (written from the spec; used to check transformers and the spec)
# ------------------------------------------------------------------------------------------------

def rms(x, w, eps):
    x32 = x.float()
    return (w.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def relu2(x):
    return torch.relu(x) ** 2


class IndependentDecoder:
    """Nemotron-H from a transformers-5 state dict (prefix "model." / "lm_head."), batch-first. Mamba-2 is computed
    as the plain recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t + D x_t (no chunking), which the
    chunked scan must equal. `clamp_prompt` applies dt = max(dt, time_step_min) on multi-token forwards only."""

    def __init__(self, state, config, prefix="model."):
        self.s = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        self.lm_head = state["lm_head.weight"]
        self.c = config
        self.types = list(config.layers_block_type)

    def new_cache(self, batch):
        c = self.c
        conv_dim = c.mamba_num_heads * c.mamba_head_dim + 2 * c.n_groups * c.ssm_state_size
        cache = []
        for t in self.types:
            if t == "linear_attention":
                cache.append({"conv": torch.zeros(batch, conv_dim, c.conv_kernel),
                              "ssm": torch.zeros(batch, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size)})
            elif t == "full_attention":
                cache.append({"k": None, "v": None})
            else:
                cache.append(None)
        return cache

    def mamba(self, i, x, cache, mask2d, clamp):
        c, s = self.c, self.s
        p = f"layers.{i}.mixer."
        H, P, N, G = c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, c.n_groups
        I = H * P
        B_, L, _ = x.shape
        if mask2d is not None:
            x = x * mask2d[:, :, None]
        proj = x @ s[p + "in_proj.weight"].T
        z, xbc, dt = proj[..., :I], proj[..., I:I + I + 2 * G * N], proj[..., I + I + 2 * G * N:]
        K = c.conv_kernel
        window = torch.cat([cache["conv"], xbc.transpose(1, 2)], dim=-1)  # [B, conv_dim, K + L]
        w = s[p + "conv1d.weight"][:, 0, :]  # [conv_dim, K]
        out = torch.stack([(window[:, :, t + 1:t + 1 + K] * w).sum(-1) for t in range(L)], dim=1)
        out = F.silu(out + s[p + "conv1d.bias"])
        cache["conv"] = window[:, :, -K:].clone()
        if mask2d is not None:
            out = out * mask2d[:, :, None]
        xs, Bm, Cm = out[..., :I], out[..., I:I + G * N], out[..., I + G * N:]
        xs = xs.view(B_, L, H, P)
        Bm = Bm.view(B_, L, G, N).repeat_interleave(H // G, dim=2)
        Cm = Cm.view(B_, L, G, N).repeat_interleave(H // G, dim=2)
        dt = F.softplus(dt + s[p + "dt_bias"])
        if clamp:
            dt = dt.clamp(min=c.time_step_min)
        A = -torch.exp(s[p + "A_log"])
        h = cache["ssm"]
        ys = []
        for t in range(L):
            h = torch.exp(dt[:, t, :, None, None] * A[None, :, None, None]) * h + \
                dt[:, t, :, None, None] * xs[:, t, :, :, None] * Bm[:, t, :, None, :]
            ys.append((h * Cm[:, t, :, None, :]).sum(-1) + s[p + "D"][None, :, None] * xs[:, t])
        cache["ssm"] = h
        y = torch.stack(ys, dim=1).reshape(B_, L, I)
        gated = y * F.silu(z)
        gs = I // G
        g = gated.view(B_, L, G, gs)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + c.layer_norm_epsilon)
        y = s[p + "norm.weight"] * g.view(B_, L, I)
        return y @ s[p + "out_proj.weight"].T

    def attention(self, i, x, cache, key_mask):
        c, s = self.c, self.s
        p = f"layers.{i}.mixer."
        B_, L, _ = x.shape
        D, A, KV = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        q = (x @ s[p + "q_proj.weight"].T).view(B_, L, A, D).transpose(1, 2)
        k = (x @ s[p + "k_proj.weight"].T).view(B_, L, KV, D).transpose(1, 2)
        v = (x @ s[p + "v_proj.weight"].T).view(B_, L, KV, D).transpose(1, 2)
        if cache["k"] is not None:
            k = torch.cat([cache["k"], k], dim=2)
            v = torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        T = k.shape[2]
        k = k.repeat_interleave(A // KV, dim=1)
        v = v.repeat_interleave(A // KV, dim=1)
        scores = q @ k.transpose(-1, -2) * D ** -0.5
        allowed = torch.ones(L, T, dtype=torch.bool).tril(T - L)[None, None] & key_mask[:, None, None, :].bool()
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        o = torch.softmax(scores, -1) @ v
        return o.transpose(1, 2).reshape(B_, L, A * D) @ s[p + "o_proj.weight"].T

    def router(self, i, x, real=None):
        """-> (weights [T, k], indices [T, k], gaps): gaps = the smallest selection margins (group choice, expert
        choice) over the real tokens."""
        c, s = self.c, self.s
        p = f"layers.{i}.mixer.gate."
        scores = torch.sigmoid(x.float() @ s[p + "weight"].float().T)
        choice = scores + s[p + "e_score_correction_bias"]
        E, G = c.n_routed_experts, c.n_group
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
        real = torch.ones(x.shape[0], dtype=torch.bool) if real is None else real
        gsorted = group_scores.sort(-1, descending=True).values[real]
        gaps = [(gsorted[:, c.topk_group - 1] - gsorted[:, c.topk_group]).min().item()] if c.topk_group < G else []
        top_groups = group_scores.topk(c.topk_group, dim=-1).indices
        gmask = torch.zeros_like(group_scores).scatter_(1, top_groups, 1.0).bool()
        masked = choice.masked_fill(~gmask.repeat_interleave(E // G, dim=1), float("-inf"))
        msorted = masked.sort(-1, descending=True).values[real]
        gaps.append((msorted[:, c.num_experts_per_tok - 1] - msorted[:, c.num_experts_per_tok]).min().item())
        idx = masked.topk(c.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, idx)
        if c.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * c.routed_scaling_factor, idx, gaps

    def moe(self, i, x):
        s = self.s
        p = f"layers.{i}.mixer."
        flat = x.reshape(-1, x.shape[-1])
        w, idx, gaps = self.router(i, flat, self.real_tokens)
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for j in range(idx.shape[1]):
                e = idx[t, j].item()
                h = relu2(flat[t] @ s[p + "experts.up_proj"][e].T) @ s[p + "experts.down_proj"][e].T
                out[t] += w[t, j] * h
        shared = relu2(flat @ s[p + "shared_experts.up_proj.weight"].T) @ s[p + "shared_experts.down_proj.weight"].T
        self.router_gaps.extend(gaps)
        return (out + shared).view(x.shape)

    def mlp(self, i, x):
        p = f"layers.{i}.mixer."
        return relu2(x @ self.s[p + "up_proj.weight"].T) @ self.s[p + "down_proj.weight"].T

    def forward(self, embeds, cache, key_mask, clamp=True):
        """embeds [B, L, H]; key_mask [B, T] over all positions so far (1 = real). Returns logits, block outputs."""
        c = self.c
        x = embeds.float()
        L = x.shape[1]
        mask2d = key_mask[:, -L:].float() if (L > 1 and not bool(key_mask.all())) else None
        self.real_tokens = key_mask[:, -L:].reshape(-1).bool()
        outs = []
        for i, t in enumerate(self.types):
            n = rms(x, self.s[f"layers.{i}.norm.weight"], c.layer_norm_epsilon)
            if t == "linear_attention":
                y = self.mamba(i, n, cache[i], mask2d, clamp and L > 1)
            elif t == "full_attention":
                y = self.attention(i, n, cache[i], key_mask)
            elif t == "moe":
                y = self.moe(i, n)
            else:
                y = self.mlp(i, n)
            x = x + y
            outs.append(x)
        logits = rms(x, self.s["norm_f.weight"], c.layer_norm_epsilon) @ self.lm_head.float().T
        return logits, outs

    def greedy(self, embeds, key_mask, steps, clamp=True):
        """Prompt forward then `steps - 1` one-token steps: (step logits [B, steps, V], tokens [B, steps], cache
        after the prompt, prompt logits, prompt block outputs)."""
        self.router_gaps = []
        cache = self.new_cache(embeds.shape[0])
        logits, outs = self.forward(embeds, cache, key_mask, clamp)
        prompt_cache = copy.deepcopy(cache)
        prompt_logits = logits
        step_logits, tokens = [logits[:, -1]], [logits[:, -1].argmax(-1)]
        for _ in range(steps - 1):
            key_mask = torch.cat([key_mask, torch.ones(key_mask.shape[0], 1, dtype=key_mask.dtype)], dim=1)
            emb = self.s["embeddings.weight"][tokens[-1]][:, None, :]
            logits, _ = self.forward(emb, cache, key_mask, clamp)
            step_logits.append(logits[:, -1])
            tokens.append(logits[:, -1].argmax(-1))
        return torch.stack(step_logits, 1), torch.stack(tokens, 1), prompt_cache, prompt_logits, outs


# ------------------------------------------------------------------------------------------------
# Shared reference helpers
# ------------------------------------------------------------------------------------------------

def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def top2_margins(logits):
    top = torch.topk(logits.float(), 2, dim=-1).values
    return (top[..., 0] - top[..., 1]).flatten().tolist()


def text_model_of(model):
    return model.language_model if hasattr(model, "language_model") else model


@torch.no_grad()
def greedy(model, inputs):
    out = model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=PAD_ID, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    step_logits = torch.stack([l.float() for l in out.logits], dim=1)  # [B, steps, V]
    assert torch.equal(step_logits.argmax(-1), tokens)
    return tokens, step_logits


@torch.no_grad()
def prompt_forward(model, inputs):
    """One prompt forward with a cache; returns (output, raw block outputs [layers, B, L, H], dt statistics)."""
    lm = text_model_of(model)
    blocks, dts = [], []
    handles = [layer.register_forward_hook(lambda m, a, k, o: blocks.append(o.detach().clone()), with_kwargs=True)
               for layer in lm.model.layers]
    for layer in lm.model.layers:
        if layer.block_type == "linear_attention":
            mixer = layer.mixer

            def in_proj_hook(module, args, output, mixer=mixer):
                dt = output[..., -mixer.num_heads:]
                dts.append(F.softplus(dt + mixer.dt_bias))
            handles.append(mixer.in_proj.register_forward_hook(in_proj_hook))
    try:
        out = model(**inputs, use_cache=True, output_hidden_states=True, logits_to_keep=0)
    finally:
        for h in handles:
            h.remove()
    return out, torch.stack(blocks), dts


def mamba_state(cache, layer_idx):
    layer = cache.layers[layer_idx]
    return layer.conv_states[0].detach().clone().contiguous(), layer.recurrent_states[0].detach().clone().contiguous()


def acceptable(tokens, margins, min_distinct, vocab_in_tokenizer=432):
    if min(margins) < MIN_MARGIN:
        return False
    for row in tokens.tolist():
        if len(set(row)) < min_distinct or any(t < NUM_SPECIALS or t >= vocab_in_tokenizer for t in row):
            return False
    return True


# ------------------------------------------------------------------------------------------------
# Group nemotron_h
# ------------------------------------------------------------------------------------------------

TEXT_PROMPTS = {
    "single": [[{"role": "user", "content": "Describe the picture. What is in this image?"}]],  # 41 tokens
    "batch": [
        [{"role": "user", "content": "Color?"}],  # 27 tokens
        [{"role": "user", "content": "The dog is running in the park. What is in this image?"}],  # 43 tokens
    ],
}


def text_case_inputs(tok, tokenizer_json):
    cases, infos = {}, {}
    for name, rows in TEXT_PROMPTS.items():
        prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in rows]
        kwargs = dict(padding=True, padding_side="left") if len(prompts) > 1 else {}
        enc = tok(prompts, return_tensors="pt", **kwargs)
        for row, text in enumerate(prompts):
            ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
            check_raw_ids(tokenizer_json, text, ids)
        cases[name] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        infos[name] = {"messages": rows if len(rows) > 1 else rows[0], "prompt": prompts if len(prompts) > 1 else
                       prompts[0], "lengths": enc["attention_mask"].sum(-1).tolist()}
    assert cases["single"]["input_ids"].shape[1] == 41, cases["single"]["input_ids"].shape
    return cases, infos


@torch.no_grad()
def text_reference(model, inputs, name):
    """Reference tensors of one text case (names without the case prefix), greedy margins, dt statistics."""
    t = {"input_ids": inputs["input_ids"].to(torch.int64).contiguous(),
         "attention_mask": inputs["attention_mask"].to(torch.int64).contiguous()}
    out, blocks, dts = prompt_forward(model, inputs)
    logits = out.logits.float()
    if name == "single":
        t["embeddings"] = model.model.embeddings(inputs["input_ids"]).contiguous()
        t["layer_outputs"] = blocks.contiguous()
        t["hidden_states"] = torch.stack(out.hidden_states).contiguous()
        assert torch.equal(out.hidden_states[0], t["embeddings"])
        assert torch.equal(out.hidden_states[-1], model.model.norm_f(blocks[-1]))
        t["logits"] = logits.contiguous()
    else:
        t["last_logits"] = logits[:, -1].contiguous()
    t["mamba_conv_state"], t["mamba_ssm_state"] = mamba_state(out.cache, 0)
    tokens, step_logits = greedy(model, inputs)
    assert (step_logits[:, 0] - logits[:, -1]).abs().max() < 1e-4, "generate's first step differs from the prompt"
    t["greedy_tokens"] = tokens.to(torch.int64).contiguous()
    t["greedy_step_logits"] = step_logits.contiguous()
    mask = inputs["attention_mask"].bool()
    clamp = [{"layer": i, "clamped": int(((d < model.config.time_step_min) & mask[..., None]).sum()),
              "of": int(mask.sum()) * d.shape[-1],
              "per_head": ((d < model.config.time_step_min) & mask[..., None]).sum((0, 1)).tolist()}
             for i, d in zip([i for i, k in enumerate(model.config.layers_block_type) if k == "linear_attention"], dts)]
    return t, top2_margins(step_logits), clamp


@torch.no_grad()
def independent_check(model, inputs, t, name, embeds=None):
    """The spec's formulas (IndependentDecoder) against transformers: prompt logits, every greedy step, the layer-0
    Mamba cache. Returns the smallest router selection gap and the effect of the prompt dt clamp."""
    lm = text_model_of(model)
    ref = IndependentDecoder(lm.state_dict(), lm.config)
    if embeds is None:
        embeds = ref.s["embeddings.weight"][inputs["input_ids"]]
    mask = inputs["attention_mask"].long()
    steps, tokens, cache, prompt_logits, outs = ref.greedy(embeds, mask, GREEDY_TOKENS)
    real = mask.bool()
    gaps = min(ref.router_gaps)
    assert torch.equal(tokens, t["greedy_tokens"]), (name, tokens, t["greedy_tokens"])
    err_steps = (steps - t["greedy_step_logits"]).abs().max().item()
    last = prompt_logits[:, -1]
    err_prompt = (last - t["greedy_step_logits"][:, 0]).abs().max().item()
    if "logits" in t:
        err_prompt = max(err_prompt, (prompt_logits - t["logits"]).abs().max().item())
    err_blocks = (torch.stack(outs) - t["layer_outputs"]).abs().max().item() if "layer_outputs" in t else 0.0
    conv, ssm = cache[0]["conv"], cache[0]["ssm"]
    err_cache = max((conv - t["mamba_conv_state"]).abs().max().item(),
                    (ssm - t["mamba_ssm_state"]).abs().max().item()) if "mamba_ssm_state" in t else 0.0
    assert max(err_steps, err_prompt, err_blocks, err_cache) < 2e-4, \
        (name, err_steps, err_prompt, err_blocks, err_cache)
    # the same without the prompt-side dt clamp (what the original remote code / mamba_ssm kernels compute)
    ref2 = IndependentDecoder(lm.state_dict(), lm.config)
    steps2, _, _, _, _ = ref2.greedy(embeds, mask, GREEDY_TOKENS, clamp=False)
    clamp_effect = (steps2 - steps).abs().max().item()
    return {"max_abs_err_step_logits": err_steps, "max_abs_err_prompt_logits": err_prompt,
            "max_abs_err_layer_outputs": err_blocks, "max_abs_err_mamba_cache": err_cache,
            "min_router_gap": gaps, "step_logits_change_without_prompt_dt_clamp": clamp_effect}


def seeded_text(first_seed, cases):
    for seed in range(first_seed, first_seed + 200):
        model = build_text_model()
        rerandomise_nemotron(model, seed)
        rounded = rounded_to_bf16(model)
        results, margins, clamps, checks, ok = {}, {}, {}, {}, True
        for name, inputs in cases.items():
            t, m, clamp = text_reference(model, inputs, name)
            _, m16, _ = text_reference(rounded, inputs, name)
            why = None if acceptable(t["greedy_tokens"], m + m16, 3 if name == "single" else 2) else "greedy"
            if why is None and not all(c["clamped"] > 0 for c in clamp):
                why = "no dt clamp"
            if why is None:
                check = independent_check(model, inputs, t, name)
                if check["min_router_gap"] < MIN_ROUTER_GAP:
                    why = f"router gap {check['min_router_gap']:.1e}"
            if why is not None:
                ok = False
                break
            results[name], margins[name], clamps[name], checks[name] = t, m, clamp, check
        if ok:
            return model, seed, results, margins, clamps, checks
        print(f"    seed {seed} rejected ({name}: {why})")
    raise SystemExit("no seed gave unambiguous greedy tokens")


TEXT_TENSOR_NOTES = {
    "input_ids": "[B, L] chat-template prompt ids (batch: left padded with <unk> = 0)",
    "attention_mask": "[B, L] 1 = real token",
    "embeddings": "[1, L, H] embeddings(input_ids) (= hidden_states[0])",
    "layer_outputs": "[layers, 1, L, H] output of every block (x + mixer(norm(x))), before norm_f",
    "hidden_states": "[layers+1, 1, L, H] transformers' output_hidden_states: embeddings, blocks 0..L-2, and as the "
                     "LAST entry norm_f(block L-1) (= last_hidden_state), not the raw last block",
    "logits": "[1, L, V] prompt logits (f32)",
    "last_logits": "[B, V] logits at the last position of each row",
    "mamba_conv_state": "[B, conv_dim, conv_kernel] layer 0's conv cache after the prompt: the last conv_kernel "
                        "columns of xBC = in_proj(masked input)[I : I + conv_dim] BEFORE the convolution",
    "mamba_ssm_state": "[B, mamba_num_heads, mamba_head_dim, ssm_state_size] layer 0's SSM state after the prompt "
                       "(f32)",
    "greedy_tokens": "[B, 8] generate(do_sample=False, max_new_tokens=8, eos_token_id=None)",
    "greedy_step_logits": "[B, 8, V] logits of every greedy step (step 0 = last prompt position); decode steps run the "
                          "recurrent Mamba update (no dt clamp) and the KV cache",
}


def describe_text_config(c):
    keep = ("vocab_size", "hidden_size", "layers_block_type", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "ssm_state_size", "mamba_num_heads", "mamba_head_dim", "n_groups", "conv_kernel",
            "expand", "chunk_size", "time_step_min", "n_routed_experts", "num_experts_per_tok",
            "moe_intermediate_size", "moe_shared_expert_intermediate_size", "n_group", "topk_group",
            "routed_scaling_factor", "norm_topk_prob", "layer_norm_epsilon", "tie_word_embeddings")
    d = c.to_dict()
    out = {k: d[k] for k in keep if k in d}
    out["hybrid_override_pattern"] = c.hybrid_override_pattern
    return out


def write_reference(out_dir, name, results, margins, infos, notes, tensor_notes):
    ref_dir = out_dir / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{case}.{key}": value.contiguous() for case, t in results.items() for key, value in t.items()}
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
    meta = {**notes, "min_margin": min(all_margins),
            "computed": "float32, eager attention, PyTorch Mamba-2 path (chunked scan for the prompt, recurrent update "
                        "for decode steps), eager MoE; greedy = generate(do_sample=False, max_new_tokens=8, "
                        "eos_token_id=None)",
            "tensor_notes": tensor_notes, "cases": cases,
            "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    write_json(ref_dir / f"{name}.json", meta)
    summary = {case: t["greedy_tokens"].tolist() for case, t in results.items()}
    print(f"  {name}: seed {notes['seed']}, min greedy margin {min(all_margins):.3f}, tokens {summary}")


def write_tokenizer_files(model_dir, tok, keep_jinja=False):
    """tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast, chat template inside, as the real checkpoints
    ship it); `keep_jinja` keeps a chat_template.jinja written by processor.save_pretrained (transformers-5 files)."""
    tok.save_pretrained(model_dir)
    (model_dir / "special_tokens_map.json").unlink(missing_ok=True)
    if not keep_jinja:
        (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config.pop("backend", None)
    write_json(model_dir / "tokenizer_config.json", config)


def write_generation_config(model_dir):
    write_json(model_dir / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1,
                                                      "eos_token_id": [2, 11], "pad_token_id": PAD_ID})


@torch.no_grad()
def check_saved_text(model_dir, tok, cases, results, expected):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="eager")
    model.eval()
    assert list(model.config.layers_block_type) == list(expected.config.layers_block_type)
    loaded = dict(model.state_dict())
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded[key], value), (model_dir, key)
    tok2 = AutoTokenizer.from_pretrained(model_dir)
    for name, rows in TEXT_PROMPTS.items():
        prompts = [tok2.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in rows]
        kwargs = dict(padding=True, padding_side="left") if len(prompts) > 1 else {}
        enc = tok2(prompts, return_tensors="pt", **kwargs)
        assert torch.equal(enc["input_ids"], results[name]["input_ids"]), (model_dir, name)
        logits = model(**enc).logits.float()[:, -1]
        assert (logits - results[name]["greedy_step_logits"][:, 0]).abs().max() < 1e-5, (model_dir, name)
    print(f"  checked {model_dir.name}: reloads and reproduces {list(TEXT_PROMPTS)}")


def make_nemotron_h(out_dir):
    start = time.time()
    tok = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp), tok)
        cases, infos = text_case_inputs(tok, Path(tmp) / "tokenizer.json")
    model, seed, results, margins, clamps, checks = seeded_text(mf.SEED + 5000, cases)
    # left padding is neutral: the padded row equals the same prompt run alone
    row0 = results["batch"]["attention_mask"][0].bool()
    alone = {"input_ids": results["batch"]["input_ids"][0][row0][None], "attention_mask": torch.ones(1, int(row0.sum()),
                                                                                                      dtype=torch.long)}
    with torch.no_grad():
        solo = model(**alone).logits[:, -1].float()
    pad_err = (solo - results["batch"]["last_logits"][0]).abs().max().item()
    assert pad_err < 1e-4, pad_err
    for case, info in infos.items():
        info["greedy_text"] = [tok.decode(r) for r in results[case]["greedy_tokens"].tolist()]
        info["dt_clamp"] = clamps[case]
        info["independent_check"] = checks[case]
    notes = {"family": "NemotronHForCausalLM", "seed": seed, "checkpoints": ["nemotron-h", "nemotron-h-hub"],
             "config": describe_text_config(model.config),
             "token_ids": {t: tok.convert_tokens_to_ids(t) for t in SPECIALS if not t.startswith("<SPECIAL_")},
             "tokenizer_size": len(tok), "pad_token_id": PAD_ID,
             "left_padding": f"neutral: the padded row's last logits equal the unpadded prompt's within {pad_err:.1e}",
             "dt_clamp": "the prompt (chunked) path clamps softplus(dt + dt_bias) from below at time_step_min "
                         "(transformers 5.24: NemotronHMamba2Mixer.time_step_limit = (time_step_min, inf)); the "
                         "one-token decode path does not clamp. 'clamped' counts prompt elements below time_step_min "
                         "per Mamba layer; independent_check.step_logits_change_without_prompt_dt_clamp is what "
                         "ignoring the clamp would cost"}
    write_reference(out_dir, "nemotron-h", results, margins, infos, notes, TEXT_TENSOR_NOTES)
    models_dir = out_dir / "models"
    model_dir = models_dir / "nemotron-h"
    model.save_pretrained(model_dir)
    write_tokenizer_files(model_dir, tok)
    write_generation_config(model_dir)
    hub_dir = models_dir / "nemotron-h-hub"
    hub_dir.mkdir(parents=True, exist_ok=True)
    (hub_dir / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    # json.dumps writes the infinite time_step_limit as a bare `Infinity` (not strict JSON), as transformers 4 did
    (hub_dir / "config.json").write_text(json.dumps(hub_text_config(model.config), indent=2) + "\n")
    write_tokenizer_files(hub_dir, tok)
    write_generation_config(hub_dir)
    for d in (model_dir, hub_dir):
        check_saved_text(d, tok, cases, results, model)
    print(f"  nemotron_h: {time.time() - start:.1f} s")


# ------------------------------------------------------------------------------------------------
# Group nemotron_omni
# ------------------------------------------------------------------------------------------------

# name -> (width, height); every file is tests/fixtures/images/<name>.png (RGB unless named "alpha")
OMNI_IMAGES = {
    "nemotron-200x90": (200, 90),     # single: grid 6 x 13 -> scaled by sqrt(48/78) -> 4 x 10 (40 patches, 10 tokens)
    "nemotron-112x112": (112, 112),   # two_images: 7 x 7 -> round(7.5) = 8 -> 8 x 8 -> 6 x 6 (36 patches, 9 tokens)
    "nemotron-40x70": (40, 70),       # two_images: 5 x 3 -> odd sides rounded up -> 6 x 4 (24 patches, 6 tokens)
    # processor-only
    "nemotron-tiny-10x10": (10, 10),  # 2 x 2 = 4 < min_num_patches 8: scaled up -> 3 x 3 -> 4 x 4
    "nemotron-wide-300x41": (300, 41),  # 3 x 19 -> 2 x 17 -> 2 x 18
}
OMNI_ALPHA = {"nemotron-alpha-40x30": (40, 30)}
MIN_NUM_PATCHES = 8
MAX_NUM_PATCHES = 48
PROCESSOR_ONLY = ["nemotron-tiny-10x10", "nemotron-wide-300x41", "nemotron-alpha-40x30"]


def write_omni_images(images_dir):
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, (w, h)) in enumerate(OMNI_IMAGES.items()):
        mf.test_image(w, h, mf.SEED + 5100 + i).save(images_dir / f"{name}.png")
    for name, (w, h) in OMNI_ALPHA.items():
        fl.alpha_image(w, h, mf.SEED + 5150).save(images_dir / f"{name}.png")


def load_image(images_dir, name):
    return Image.open(images_dir / f"{name}.png")


def omni_image_processor(**overrides):
    from transformers import NemotronH_Omni_Reasoning_V3ImageProcessor
    kwargs = dict(patch_size=16, downsample_ratio=0.5, min_num_patches=MIN_NUM_PATCHES, max_num_patches=MAX_NUM_PATCHES,
                  max_model_len=16384, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, do_convert_rgb=True)
    kwargs.update(overrides)
    return NemotronH_Omni_Reasoning_V3ImageProcessor(**kwargs)


def omni_processor(tok):
    from transformers import NemotronH_Omni_Reasoning_V3Processor, NemotronH_Omni_Reasoning_V3VideoProcessor
    video = NemotronH_Omni_Reasoning_V3VideoProcessor(norm_mean=CLIP_MEAN, norm_std=CLIP_STD, patch_size=16,
                                                      downsample_ratio=0.5, video_target_num_patches=16)
    from transformers import ParakeetFeatureExtractor
    # the processor class insists on all four sub-processors, audio included, even for an image-only checkpoint
    return NemotronH_Omni_Reasoning_V3Processor(image_processor=omni_image_processor(), video_processor=video,
                                                tokenizer=tok, feature_extractor=ParakeetFeatureExtractor(),
                                                chat_template=CHAT_TEMPLATE)


def load_processor(model_dir):
    from transformers import AutoProcessor
    os.environ["HF_HUB_OFFLINE"] = "1"
    return AutoProcessor.from_pretrained(model_dir)


def image_part(name):
    return {"type": "image", "image": f"{name}.png"}


def text_part(text):
    return {"type": "text", "text": text}


OMNI_CASES = {
    "single": [{"role": "user", "content": [image_part("nemotron-200x90"), text_part("What is in this image?")]}],
    "two_images": [{"role": "system", "content": "Answer briefly."},
                   {"role": "user", "content": [text_part("Compare "), image_part("nemotron-112x112"),
                                                text_part(" with "), image_part("nemotron-40x70"),
                                                text_part(", please.")]}],
}


def process_omni_case(processor, images_dir, messages, tokenizer_json):
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [load_image(images_dir, part["image"][:-len(".png")]) for m in messages
              if not isinstance(m["content"], str) for part in m["content"] if part["type"] == "image"]
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    # (this processor does not return replacement offsets): every "<image>" of the rendered prompt, in order, becomes
    # "<img>" + "<image>" x (grid_h * grid_w / 4) + "</img>"
    pieces = prompt.split("<image>")
    assert len(pieces) == len(images) + 1
    expanded = pieces[0]
    for (gh, gw), piece in zip(inputs["image_grid_hw"].tolist(), pieces[1:]):
        expanded += "<img>" + "<image>" * (gh * gw // 4) + "</img>" + piece
    ids = inputs["input_ids"][0].tolist()
    assert processor.tokenizer(expanded)["input_ids"] == ids
    check_raw_ids(tokenizer_json, expanded, ids)
    info = {"messages": messages, "prompt": prompt, "prompt_expanded": expanded,
            "images": [{"file": f"images/{Path(img.filename).name}", "width": img.size[0], "height": img.size[1],
                        "grid_hw": g, "image_tokens": g[0] * g[1] // 4}
                       for img, g in zip(images, inputs["image_grid_hw"].tolist())]}
    return dict(inputs), info


@torch.no_grad()
def omni_reference(model, inputs, name):
    t = {"input_ids": inputs["input_ids"].to(torch.int64).contiguous(),
         "attention_mask": inputs["attention_mask"].to(torch.int64).contiguous(),
         "pixel_values": inputs["pixel_values"].float().contiguous(),
         "image_grid_hw": inputs["image_grid_hw"].to(torch.int64).contiguous()}
    grid = inputs["image_grid_hw"]
    vout = model.vision_model(inputs["pixel_values"], image_grid_hw=grid, output_hidden_states=True)
    hs = torch.stack([h[0] if h.dim() == 3 else h for h in vout.hidden_states])  # [blocks+1, S, C]
    t["vision_hidden_states"] = hs.contiguous()
    assert torch.equal(hs[-1], vout.last_hidden_state)
    t["vision_features"] = vout.features.contiguous()
    shuffled = torch.cat([model.pixel_shuffle(f.view(1, gh, gw, -1), scale_factor=model.config.downsample_ratio)
                          .flatten(0, 2) for f, (gh, gw) in zip(vout.features.split(grid.prod(-1).tolist()),
                                                                 grid.tolist())])
    t["vision_shuffled"] = shuffled.contiguous()
    feats = torch.cat(model.get_image_features(inputs["pixel_values"], grid).pooler_output)
    assert torch.equal(feats, model.multi_modal_projector(shuffled))
    t["image_features"] = feats.contiguous()
    logits = model(**inputs).logits.float()
    if name == "single":
        t["logits"] = logits.contiguous()
    else:
        t["last_logits"] = logits[:, -1].contiguous()
    tokens, step_logits = greedy(model, inputs)
    assert (step_logits[:, 0] - logits[:, -1]).abs().max() < 1e-4, "generate's first step differs from the prompt"
    t["greedy_tokens"] = tokens.to(torch.int64).contiguous()
    t["greedy_step_logits"] = step_logits.contiguous()
    return t, top2_margins(step_logits)


def bilinear_resize(table, out_h, out_w):
    """torch's bilinear, align_corners=False, no antialias, written out: table [C, H, W] -> [C, out_h, out_w]."""
    def coords(n_in, n_out):
        scale = n_in / n_out
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).float()
    y0, y1, wy = coords(table.shape[1], out_h)
    x0, x1, wx = coords(table.shape[2], out_w)
    top = table[:, y0][:, :, x0] * (1 - wx) + table[:, y0][:, :, x1] * wx
    bottom = table[:, y1][:, :, x0] * (1 - wx) + table[:, y1][:, :, x1] * wx
    return top * (1 - wy)[None, :, None] + bottom * wy[None, :, None]


@torch.no_grad()
def independent_vision(model, pixel_values, grid):
    """RADIO (packed images, block-diagonal attention), pixel shuffle and projector from the spec."""
    s = {k: v.float() for k, v in model.state_dict().items()}
    vc = model.config.vision_config
    C, heads = vc.hidden_size, vc.num_attention_heads
    side = vc.max_img_size // vc.patch_size
    prefix = vc.num_cls_tokens + vc.num_registers
    patches = pixel_values.float() @ s["vision_model.embeddings.patch_projection.weight"].T
    table = s["vision_model.embeddings.position_embedding"].reshape(side, side, C).permute(2, 0, 1)
    seqs = []
    for (gh, gw), p in zip(grid.tolist(), patches.split(grid.prod(-1).tolist())):
        m = max(gh, gw)
        pos = bilinear_resize(table, m, m)[:, :gh, :gw].reshape(C, -1).T
        seqs.append(torch.cat([s["vision_model.embeddings.cls_register_token"], p + pos]))
    embeddings = torch.cat(seqs)
    outs = []
    for x in seqs:
        for i in range(vc.num_hidden_layers):
            p = f"vision_model.encoder.layer.{i}."
            n = F.layer_norm(x, (C,), s[p + "norm1.weight"], s[p + "norm1.bias"], vc.layer_norm_eps)
            q, k, v = (n @ s[p + f"attention.{w}_proj.weight"].T + s[p + f"attention.{w}_proj.bias"] for w in "qkv")
            q, k, v = (y.view(-1, heads, C // heads).transpose(0, 1) for y in (q, k, v))
            a = torch.softmax(q @ k.transpose(-1, -2) * (C // heads) ** -0.5, -1) @ v
            a = a.transpose(0, 1).reshape(-1, C) @ s[p + "attention.o_proj.weight"].T + s[p + "attention.o_proj.bias"]
            x = x + s[p + "layer_scale1.lambda1"] * a
            n = F.layer_norm(x, (C,), s[p + "norm2.weight"], s[p + "norm2.bias"], vc.layer_norm_eps)
            h = F.gelu(n @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
            x = x + s[p + "layer_scale2.lambda1"] * (h @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"])
        outs.append(x)
    features = torch.cat([o[prefix:] for o in outs])
    shuffled = []
    for f, (gh, gw) in zip(features.split(grid.prod(-1).tolist()), grid.tolist()):
        f = f.view(gh, gw, C)
        for n_ in range(gh // 2):
            for m_ in range(gw // 2):
                shuffled.append(torch.cat([f[2 * n_, 2 * m_], f[2 * n_, 2 * m_ + 1], f[2 * n_ + 1, 2 * m_],
                                           f[2 * n_ + 1, 2 * m_ + 1]]))
    shuffled = torch.stack(shuffled)
    h = rms(shuffled, s["multi_modal_projector.layer_norm.weight"], 1e-5)
    h = relu2(h @ s["multi_modal_projector.linear_1.weight"].T) @ s["multi_modal_projector.linear_2.weight"].T
    return embeddings, features, shuffled, h


@torch.no_grad()
def independent_omni_check(model, inputs, t, name):
    emb, feats, shuffled, image_features = independent_vision(model, inputs["pixel_values"], inputs["image_grid_hw"])
    errs = {"vision_embeddings": (emb - t["vision_hidden_states"][0]).abs().max().item(),
            "vision_features": (feats - t["vision_features"]).abs().max().item(),
            "vision_shuffled": (shuffled - t["vision_shuffled"]).abs().max().item(),
            "image_features": (image_features - t["image_features"]).abs().max().item()}
    assert max(errs.values()) < 1e-4, (name, errs)
    lm = model.language_model
    embeds = lm.model.embeddings.weight.detach()[inputs["input_ids"]].clone()
    image_positions = inputs["input_ids"] == model.config.image_token_id
    assert int(image_positions.sum()) == image_features.shape[0]
    embeds[image_positions] = image_features  # row-major over (batch, position)
    check = independent_check(model, inputs, t, name, embeds=embeds)
    check.update({f"max_abs_err_{k}": v for k, v in errs.items()})
    return check


def seeded_omni(first_seed, cases):
    for seed in range(first_seed, first_seed + 200):
        model = build_omni_model()
        rerandomise_nemotron(model, seed)
        rounded = rounded_to_bf16(model)
        results, margins, checks, ok = {}, {}, {}, True
        for name, inputs in cases.items():
            t, m = omni_reference(model, inputs, name)
            _, m16 = omni_reference(rounded, inputs, name)
            why = None if acceptable(t["greedy_tokens"], m + m16, 3) else "greedy"
            if why is None:
                check = independent_omni_check(model, inputs, t, name)
                if check["min_router_gap"] < MIN_ROUTER_GAP:
                    why = f"router gap {check['min_router_gap']:.1e}"
            if why is not None:
                ok = False
                break
            results[name], margins[name], checks[name] = t, m, check
        if ok:
            return model, seed, results, margins, checks
        print(f"    seed {seed} rejected ({name}: {why})")
    raise SystemExit("no seed gave unambiguous greedy tokens")


OMNI_TENSOR_NOTES = {
    "input_ids": "[1, L] processor output: each image's <image> placeholder expanded to <img> + <image> x tokens + "
                 "</img> (tokens = grid_h * grid_w / 4)",
    "attention_mask": "[1, L] all ones",
    "pixel_values": "[P, 768] float32, the processor's output: every image resized (bicubic, antialias, on float32 "
                    "0..255 values, no clamping/rounding) to grid*16 pixels, (x/255 - mean)/std, cut into 16x16 "
                    "patches in row-major patch order, each flattened channel-major (c, y, x); images concatenated",
    "image_grid_hw": "[N, 2] patch grid (rows, cols) of each image",
    "vision_hidden_states": "[4, S, 32] index 0 = input of RADIO block 0 (the embeddings), images packed: per image 2 "
                            "CLS + 2 register tokens, then its patches (patch_projection(pixels) + position table "
                            "resized to the larger grid side and cropped top-left), S = sum(4 + gh*gw); index k = "
                            "output of "
                            "block k-1 (attention only within an image; no final norm)",
    "vision_features": "[P, 32] last block output without each image's 4 prefix tokens (no final norm)",
    "vision_shuffled": "[P/4, 128] pixel shuffle per image: token (n, m) of the (gh/2, gw/2) grid, row-major, = "
                       "cat(f[2n, 2m], f[2n, 2m+1], f[2n+1, 2m], f[2n+1, 2m+1])",
    "image_features": "[P/4, 64] projector output linear_2(relu(linear_1(rmsnorm(x)))^2), scattered in order onto the "
                      "<image> (id 18) positions",
    "logits": "[1, L, V] prompt logits",
    "last_logits": "[1, V] last-position logits",
    "greedy_tokens": "[1, 8] generate(do_sample=False, max_new_tokens=8, eos_token_id=None)",
    "greedy_step_logits": "[1, 8, V] logits of every greedy step (step 0 = last prompt position)",
    "processor_*.pixel_values": "processor-only cases: pixel_values of one image ([gh*gw, 768]) and image_grid_hw",
}


def grid_table(min_num_patches, max_num_patches, max_model_len, sizes, n_images=1):
    from transformers.models.nemotron_h_omni.image_processing_nemotron_h_omni import get_patch_grid_size
    budget = max((max_model_len - 4) * 4, min_num_patches * n_images)
    if max_num_patches:
        budget = min(budget, max_num_patches)
    budget = max(budget, min_num_patches)
    rows = []
    for w, h in sizes:
        try:
            gh, gw = get_patch_grid_size(h, w, 16, 2, min_num_patches, budget)
        except ZeroDivisionError:  # a side floored to 0 patches, then the min_num_patches rescale divides by 0
            rows.append({"width": w, "height": h, "error": "ZeroDivisionError in get_patch_grid_size"})
            continue
        rows.append({"width": w, "height": h, "grid_hw": [gh, gw], "image_tokens": gh * gw // 4})
    return {"min_num_patches": min_num_patches, "max_num_patches": max_num_patches, "max_model_len": max_model_len,
            "per_image_budget": budget, "sizes": rows}


GRID_SIZES = [(1, 1), (10, 10), (16, 16), (17, 17), (32, 32), (40, 70), (112, 112), (200, 90), (300, 41), (41, 300),
              (96, 96), (100, 100), (128, 48), (250, 250), (500, 375), (1000, 10)]
REAL_GRID_SIZES = [(1, 1), (100, 100), (512, 512), (640, 480), (1024, 768), (1280, 720), (1920, 1080), (2048, 2048),
                   (3000, 4000), (4000, 3000), (5000, 100), (100, 5000), (1000, 1000), (1008, 1008), (1024, 1024),
                   (2880, 2880), (800, 600)]


def processor_only_cases(processor, images_dir):
    tensors, infos = {}, []
    for name in PROCESSOR_ONLY:
        image = load_image(images_dir, name)
        out = processor.image_processor(images=[image], return_tensors="pt")
        key = "processor_" + name.removeprefix("nemotron-").replace("-", "_")
        tensors[f"{key}.pixel_values"] = out["pixel_values"].float().contiguous()
        tensors[f"{key}.image_grid_hw"] = out["image_grid_hw"].to(torch.int64).contiguous()
        infos.append({"case": key, "image": f"images/{name}.png", "width": image.size[0], "height": image.size[1],
                      "mode": image.mode, "grid_hw": out["image_grid_hw"][0].tolist()})
    return tensors, infos


def save_omni(model, model_dir, tok):
    model.save_pretrained(model_dir)
    processor = omni_processor(tok)
    processor.save_pretrained(model_dir)
    processor.image_processor.save_pretrained(model_dir)  # the flat preprocessor_config.json as well
    write_tokenizer_files(model_dir, tok, keep_jinja=True)
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    write_generation_config(model_dir)


@torch.no_grad()
def check_saved_omni(model_dir, images_dir, results, expected):
    from transformers import NemotronH_Omni_Reasoning_V3
    processor = load_processor(model_dir)
    model = NemotronH_Omni_Reasoning_V3.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                        experts_implementation="eager")
    model.eval()
    loaded = dict(model.state_dict())
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded[key], value), (model_dir, key)
    for name, messages in OMNI_CASES.items():
        inputs, _ = process_omni_case(processor, images_dir, messages, model_dir / "tokenizer.json")
        ref = results[name]
        assert torch.equal(inputs["input_ids"], ref["input_ids"]), (model_dir, name)
        assert torch.equal(inputs["pixel_values"].float(), ref["pixel_values"]), (model_dir, name)
        logits = model(**inputs).logits.float()[:, -1]
        assert (logits - ref["greedy_step_logits"][:, 0]).abs().max() < 1e-5, (model_dir, name)
    print(f"  checked {model_dir.name}: reloads and reproduces {list(OMNI_CASES)}")


def make_nemotron_omni(out_dir):
    start = time.time()
    images_dir = out_dir / "images"
    write_omni_images(images_dir)
    tok = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        save_dir = Path(tmp)
        omni_processor(tok).save_pretrained(save_dir)
        processor = load_processor(save_dir)
        cases, infos = {}, {}
        for name, messages in OMNI_CASES.items():
            cases[name], infos[name] = process_omni_case(processor, images_dir, messages, save_dir / "tokenizer.json")
        proc_tensors, proc_infos = processor_only_cases(processor, images_dir)
    model, seed, results, margins, checks = seeded_omni(mf.SEED + 5200, cases)
    for case, info in infos.items():
        info["greedy_text"] = [tok.decode(r) for r in results[case]["greedy_tokens"].tolist()]
        info["independent_check"] = checks[case]
    c = model.config
    notes = {"family": "NemotronH_Omni_Reasoning_V3 (nemotron_h_omni) = RadioModel + pixel shuffle + projector + "
                       "NemotronHForCausalLM", "seed": seed, "checkpoints": ["nemotron-omni"],
             "config": {"text_config": describe_text_config(c.text_config),
                        "vision_config": {k: v for k, v in c.vision_config.to_dict().items()
                                          if k not in ("transformers_version", "architectures")},
                        "downsample_ratio": c.downsample_ratio, "projector_hidden_size": c.projector_hidden_size,
                        "vision_hidden_size": c.vision_hidden_size, "image_token_id": c.image_token_id},
             "token_ids": {t: tok.convert_tokens_to_ids(t) for t in SPECIALS if not t.startswith("<SPECIAL_")},
             "processor": {"min_num_patches": MIN_NUM_PATCHES, "max_num_patches": MAX_NUM_PATCHES,
                           "max_model_len": 16384, "patch_size": 16, "downsample_ratio": 0.5,
                           "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": "bicubic (3), torchvision "
                           "antialias, on float32 values (no uint8 rounding)",
                           "processor_only_cases": proc_infos,
                           "grid_rule_fixture": grid_table(MIN_NUM_PATCHES, MAX_NUM_PATCHES, 16384, GRID_SIZES),
                           "grid_rule_real": grid_table(1024, 13312, 16384, REAL_GRID_SIZES)}}
    results_all = dict(results)
    write_reference(out_dir, "nemotron-omni", results_all, margins, infos, notes, OMNI_TENSOR_NOTES)
    # the processor-only tensors go into the same file
    from safetensors.torch import load_file
    ref_path = out_dir / "reference" / "nemotron-omni.safetensors"
    tensors = load_file(str(ref_path))
    tensors.update(proc_tensors)
    save_file(tensors, str(ref_path))
    model_dir = out_dir / "models" / "nemotron-omni"
    save_omni(model, model_dir, tok)
    check_saved_omni(model_dir, images_dir, results, model)
    print(f"  nemotron_omni: {time.time() - start:.1f} s")


GROUP_FUNCTIONS = {
    "nemotron_h": make_nemotron_h,
    "nemotron_omni": make_nemotron_omni,
}


def make_group(group, out_dir):
    GROUP_FUNCTIONS[group](out_dir)
