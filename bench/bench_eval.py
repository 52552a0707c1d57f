"""`tinyhun eval perplexity` speed and agreement on SmolLM2-135M-Instruct vs transformers fp32: the same text (the
shipped sample, tinyhun/data/eval/support.txt), the same windows, the same run.

    python bench/bench_eval.py [--window 512] [--stride 256] [--repeat 2]

Rows: tinyhun on the INT4 default model and on the fp32 folder (both Numba), transformers fp32 (eager attention
and sdpa) on the fp32 folder; tokens/s counts the tokens run through the model, context included.
"""
import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

import tinyhun
from tinyhun import evaluate
from tinyhun.hub import default_gguf, default_model_dir, model_from_gguf


def fp32_folder():
    """SmolLM2's fully dequantized fp32 folder, converted once into the temp folder."""
    return model_from_gguf(default_gguf(progress=False), progress=False,
                           root=Path(tempfile.gettempdir()) / "tinyhun-bench", name="SmolLM2-135M-Instruct-f32",
                           keep_quantized=False)


def torch_perplexity(model, ids, window, stride):
    import torch
    nll, count, run = 0.0, 0, 0
    t0 = time.perf_counter()
    for begin, end, first in evaluate.windows(len(ids), window, stride):
        with torch.no_grad():
            logits = model(torch.as_tensor(ids[begin:end - 1])[None]).logits[0, first - 1 - begin:]
        nll -= float(evaluate.log_softmax_at(logits.numpy(), ids[first:end]).sum())
        count += end - first
        run += end - 1 - begin
    seconds = time.perf_counter() - t0
    return {"perplexity": math.exp(nll / count), "tokens": count, "tokens_run": run, "seconds": seconds,
            "tokens_per_s": run / seconds}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    f32_dir = fp32_folder()
    text = evaluate.read_text(evaluate.SAMPLES["perplexity"])
    ours = {"tinyhun int4": tinyhun.load(default_model_dir(progress=False)), "tinyhun fp32": tinyhun.load(f32_dir)}
    hf = {f"transformers fp32 {impl}": AutoModelForCausalLM.from_pretrained(
        f32_dir, dtype=torch.float32, attn_implementation=impl).eval() for impl in ("eager", "sdpa")}
    ids = np.asarray(ours["tinyhun fp32"].tokenizer.encode(text), np.int64)
    for m in ours.values():
        evaluate.perplexity(m, text, window=200, stride=100, limit=199)   # warm-up: compile both matmul paths
    rows = {name: [] for name in [*ours, *hf]}
    for _ in range(args.repeat):   # interleaved
        for name, m in ours.items():
            rows[name].append(evaluate.perplexity(m, text, window=args.window, stride=args.stride))
        for name, m in hf.items():
            rows[name].append(torch_perplexity(m, ids, args.window, args.stride))
    print(f"{len(ids)} tokens, window {args.window}, stride {args.stride}, best of {args.repeat}, "
          f"torch threads {torch.get_num_threads()}")
    peer = max(r["tokens_per_s"] for r in rows["transformers fp32 sdpa"])
    for name, rs in rows.items():
        best = max(rs, key=lambda r: r["tokens_per_s"])
        print(f"{name:24s} perplexity {best['perplexity']:.4f}  {best['tokens_per_s']:8.1f} tokens/s  "
              f"x{best['tokens_per_s'] / peer:.2f} of transformers sdpa")


if __name__ == "__main__":
    main()
