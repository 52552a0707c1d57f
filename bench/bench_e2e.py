"""End-to-end prefill/decode speed on a randomly initialised Hunyuan-0.5B-shaped model, tinyhun vs transformers fp32.

    python bench/bench_e2e.py [--prompt-tokens 128] [--gen-tokens 32] [--engines numpy,numba,int4,int4-q4head]

Engines: fp32 with the NumPy reference kernels, fp32 with the Numba kernels, INT4 (tinyhun quantize, group 32,
symmetric; INT8 lm_head, or INT4 with int4-q4head) with the Numba kernels, each in its own `tinyhun bench --json`
process; plus transformers fp32 in this process.

The model (hidden 1024, 24 layers, 16/8 heads, head_dim 128, intermediate 3584, vocab 120818, tied) is made on the fly
in a temp folder and never committed. Every engine runs on the same weights in the same run, so the ratios are
comparable even on a noisy machine; absolute figures across runs are not.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HUNYUAN_05B = dict(model_type="hunyuan_v1_dense", architectures=["HunYuanDenseV1ForCausalLM"], vocab_size=120818,
                   hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=32768,
                   tie_word_embeddings=True, hidden_act="silu", torch_dtype="float32",
                   rope_theta=10000.0, rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0})


def make_model(folder, layers=24, seed=0):
    """Random fp32 weights with the 0.5B's shapes (norm weights near 1 so activations stay sane)."""
    from tinyhun.families import config_from_dict, family_of
    cfg_dict = {**HUNYUAN_05B, "num_hidden_layers": layers}
    cfg = config_from_dict(cfg_dict)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in family_of(cfg).checkpoint_shapes(cfg).items():
        if len(shape) == 1:
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32))
        else:
            tensors[name] = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    save_file(tensors, str(Path(folder) / "model.safetensors"))
    (Path(folder) / "config.json").write_text(json.dumps(cfg_dict))


def bench_torch(folder, prompt_tokens, gen_tokens, repetitions):
    """transformers fp32 on the same folder, prompt and greedy loop as tinyhun.bench (first run is a warm-up)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    prompt = torch.as_tensor(np.random.default_rng(0).integers(0, vocab, size=prompt_tokens))[None]
    pre, dec = [], []
    with torch.no_grad():
        for rep in range(repetitions + 1):
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            t1 = time.perf_counter()
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            for _ in range(gen_tokens):
                out = model(token, cache=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t3 = time.perf_counter()
            if rep:   # the first is a warm-up
                pre.append(prompt_tokens / (t1 - t0))
                dec.append(gen_tokens / (t3 - t2))
    return {"prefill_tok_s": float(np.mean(pre)), "decode_tok_s": float(np.mean(dec))}


def tinyhun_bench(model_dir, kernels, args):
    """`tinyhun bench --json` in its own process, so that its peak RSS is its own."""
    cmd = [sys.executable, "-m", "tinyhun.cli", "bench", "--model", model_dir, "--json", "--quiet",
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--repetitions", str(args.repetitions)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "TINYHUN_KERNELS": kernels})
    return json.loads(out.stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--engines", default="numpy,numba,int4,int4-q4head")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args()

    from tinyhun.quantize import quantize_model

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        make_model(folder, layers=args.layers)
        for engine in args.engines.split(","):
            model_dir, name = folder, f"tinyhun fp32 {engine}"
            if engine.startswith("int4"):   # int4: INT8 lm_head (the default); int4-q4head: INT4 lm_head too
                head = "q4" if engine == "int4-q4head" else "q8"
                model_dir, name = str(Path(folder) / engine), f"tinyhun int4 (head {head})"
                t0 = time.perf_counter()
                quantize_model(folder, model_dir, head=head, progress=False)
                print(f"quantize --head {head}: {time.perf_counter() - t0:.1f} s, "
                      f"{(Path(model_dir) / 'model.safetensors').stat().st_size / 1e6:.0f} MB")
            rows[name] = tinyhun_bench(model_dir, "numpy" if engine == "numpy" else "numba", args)
        if not args.no_torch:
            rows["transformers fp32"] = bench_torch(folder, args.prompt_tokens, args.gen_tokens, args.repetitions)
    print(f"Hunyuan-0.5B-shaped random model ({args.layers} layers), prompt {args.prompt_tokens}, "
          f"gen {args.gen_tokens}, mean of {args.repetitions} after a warm-up")
    print_table(rows)


def print_table(rows):
    peer = rows.get("transformers fp32")
    print(f"{'engine':<22}{'prefill tok/s':>14}{'decode tok/s':>14}{'GB/s':>7}{'MB/token':>10}"
          f"{'RSS MB':>8}{'vs torch decode':>17}")
    for name, r in rows.items():
        gbs = f"{r['decode_gb_s']:.1f}" if "decode_gb_s" in r else "-"
        mb = f"{r['bytes_per_token'] / 1e6:.0f}" if "bytes_per_token" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        ratio = f"{r['decode_tok_s'] / peer['decode_tok_s']:.2f}x" if peer else "-"
        print(f"{name:<22}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.2f}{gbs:>7}{mb:>10}{rss:>8}{ratio:>17}")


if __name__ == "__main__":
    main()
