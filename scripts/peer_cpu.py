#!/usr/bin/env python3
"""The transformers peer of `bench` on the CPU: the same InternVL3-shaped models with random
weights, the same rows, the same JSON keys, so one command gives the side-by-side table.

    pip install torch torchvision transformers          # CPU is enough
    python3 scripts/peer_cpu.py --size 1b --rows vision_1,ttft_1,decode_bs1 --decode-tokens 32 --dtype f32
    cargo run --release --example bench -- --size 1b --rows vision_1,ttft_1,decode_bs1 --decode-tokens 32

Rows: vision_1 / vision_7 / vision_13 (vision tower + projector for that many 448-px tiles, ms),
ttft_1 / ttft_13 (one image of that many tiles + 32 text tokens, prefill to the first token, ms),
decode_bs1 / decode_bs16 (greedy tokens per second after a 1-tile prompt). Each timing is the
median of --runs after one warm-up. Threads: torch's default (all cores); set OMP_NUM_THREADS to
change it.
"""

import argparse
import json
import time

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

TEXT = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                 tie_word_embeddings=True),
    "1b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
               tie_word_embeddings=True),
    "2b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
               intermediate_size=8960, tie_word_embeddings=True),
    "8b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, tie_word_embeddings=False),
}
VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, norm_type="layer_norm",
              use_qk_norm=False, attention_bias=True, image_size=[448, 448], patch_size=[14, 14], layer_norm_eps=1e-6)
IMAGE_TOKEN = 151667
ROWS = ["vision_1", "vision_7", "vision_13", "ttft_13", "ttft_1", "decode_bs1", "decode_bs16"]


def build(size, dtype):
    config = InternVLConfig(vision_config=VISION,
                            text_config=dict(model_type="qwen2", vocab_size=151674, rope_theta=1e6,
                                             max_position_embeddings=32768, **TEXT[size]),
                            image_token_id=IMAGE_TOKEN, image_seq_length=256, downsample_ratio=0.5,
                            projector_hidden_act="gelu")
    config._attn_implementation = "sdpa"
    model = InternVLForConditionalGeneration(config).to(dtype).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def median(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def prompt(tiles, batch, dtype):
    ids = [1] * 4 + [IMAGE_TOKEN] * (256 * tiles) + [(i * 7919 + 13) % 150000 for i in range(32)]
    ids = torch.tensor([ids] * batch)
    pixels = torch.randn(batch * tiles, 3, 448, 448, dtype=dtype)
    return ids, pixels


@torch.inference_mode()
def bench(size, args):
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    model = build(size, dtype)
    row = {"size": size, "engine": f"transformers {__import__('transformers').__version__} + torch {torch.__version__}",
           "dtype": args.dtype, "threads": torch.get_num_threads(),
           "params": sum(p.numel() for p in model.parameters())}
    wants = lambda name: args.rows is None or name in args.rows
    for tiles in (1, 7, 13):
        if wants(f"vision_{tiles}"):
            pixels = torch.randn(tiles, 3, 448, 448, dtype=dtype)
            features = lambda: model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                              vision_feature_select_strategy="default")
            row[f"vision_ms_{tiles}tiles"] = median(features, args.runs) * 1e3
    for tiles, key in ((13, "ttft_ms_13tiles"), (1, "ttft_ms_1tile")):
        if wants(f"ttft_{tiles}"):
            ids, pixels = prompt(tiles, 1, dtype)
            row[key] = median(lambda: model(input_ids=ids, pixel_values=pixels, logits_to_keep=1), args.runs) * 1e3
    for batch, default_steps, key in ((1, 256, "decode_tok_s_bs1"), (16, 128, "decode_tok_s_bs16")):
        if not wants(f"decode_bs{batch}"):
            continue
        steps = args.decode_tokens or default_steps
        ids, pixels = prompt(1, batch, dtype)

        def decode():
            # Decode time alone: generate one token (prefill) and the whole run, and subtract.
            start = time.perf_counter()
            model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                           do_sample=False)
            return time.perf_counter() - start - prefill

        decode()  # warm-up
        times = sorted(decode() for _ in range(args.runs))
        row[key] = batch * steps / times[len(times) // 2]
        row[f"{key}_new_tokens"] = steps
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", default=None, help="tiny, 1b, 2b or 8b (repeatable)")
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--rows", type=lambda s: s.split(","), default=None, help=",".join(ROWS))
    parser.add_argument("--decode-tokens", type=int, default=None)
    args = parser.parse_args()
    for row in args.rows or []:
        if row not in ROWS:
            parser.error(f"unknown row {row} (rows: {', '.join(ROWS)})")
    for size in args.size or ["tiny"]:
        print(json.dumps(bench(size, args)), flush=True)


if __name__ == "__main__":
    main()
