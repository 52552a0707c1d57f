"""Decode speed of a LoRA adapter's side path vs the same model without it (what a merged adapter costs: nothing),
on SmolLM2-135M-Instruct, interleaved in one run.

    python bench/bench_adapters.py [--gen-tokens 64] [--rounds 5] [--rank 16]

Rows: the INT4 default model (Q4_1 matrices), bare and with a random peft-format adapter as a side path on q/v
(the common LoraConfig) and on all seven linears; the fp32 folder merged (the bare cost) and as a side path.
The overhead is the side path's decode time over the bare (merged-equivalent) model's, target <= 10 %.
On a machine shared with other work, `NUMBA_NUM_THREADS=1 python bench/bench_adapters.py --cpu-time` times the
process's CPU seconds instead of wall time, which other processes' load barely moves.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import fp32_folder

import tinyhun
from tinyhun.adapters import PARENT
from tinyhun.hub import default_model_dir


def write_adapter(folder, cfg, targets, r, seed=0):
    """A peft adapter folder with random A and B (non-zero B, so the side path does real work)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out_of = {"q_proj": cfg.q_dim, "k_proj": cfg.kv_dim, "v_proj": cfg.kv_dim, "o_proj": cfg.hidden_size,
              "gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size}
    in_of = {t: cfg.intermediate_size if t == "down_proj" else (cfg.q_dim if t == "o_proj" else cfg.hidden_size)
             for t in targets}
    tensors = {}
    for i in range(cfg.num_layers):
        for t in targets:
            p = f"base_model.model.model.layers.{i}.{PARENT[t]}.{t}."
            tensors[p + "lora_A.weight"] = (0.02 * rng.standard_normal((r, in_of[t]))).astype(np.float32)
            tensors[p + "lora_B.weight"] = (0.02 * rng.standard_normal((out_of[t], r))).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets, "lora_dropout": 0.1,
         "bias": "none", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    return folder


def decode_seconds(model, prompt, gen_tokens, clock):
    """Seconds per greedy decode step after a prefill of prompt."""
    cache = model.new_cache(len(prompt) + gen_tokens + 1)
    token = np.array([int(np.argmax(model.forward(cache, prompt)[0]))])
    t0 = clock()
    for _ in range(gen_tokens):
        token[0] = int(np.argmax(model.forward(cache, token)[0]))
    return (clock() - t0) / gen_tokens


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--cpu-time", action="store_true", help="time CPU seconds of this process, not wall time")
    p.add_argument("--int4-only", action="store_true", help="only the INT4 rows (the fp32 ones take most of the run)")
    args = p.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    q4_dir = default_model_dir(progress=False)
    cfg = tinyhun.load(q4_dir).config
    with tempfile.TemporaryDirectory() as tmp:
        qv = write_adapter(Path(tmp) / "qv", cfg, ["q_proj", "v_proj"], args.rank)
        every = write_adapter(Path(tmp) / "all", cfg, list(PARENT), args.rank, seed=1)
        engines = {
            "int4 bare": tinyhun.load(q4_dir),
            "int4 + side q,v": tinyhun.load(q4_dir, adapter=qv),
            "int4 + side all 7": tinyhun.load(q4_dir, adapter=every),
        }
        if not args.int4_only:
            f32_dir = fp32_folder()
            engines["fp32 merged all 7"] = tinyhun.load(f32_dir, adapter=every)
            engines["fp32 + side all 7"] = tinyhun.load(f32_dir, adapter=every, adapter_mode="side")
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=args.prompt_tokens)
        times = {name: [] for name in engines}
        for name, m in engines.items():   # warm-up: compile every layer type once
            decode_seconds(m, prompt, 2, clock)
        for _ in range(args.rounds):       # interleaved: the machine's load hits every engine alike
            for name, m in engines.items():
                times[name].append(decode_seconds(m, prompt, args.gen_tokens, clock))
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    peer = {"int4": med["int4 bare"], "fp32": med.get("fp32 merged all 7")}
    print(f"decode, {args.gen_tokens} tokens after {args.prompt_tokens}, rank {args.rank}, median of {args.rounds}, "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    for name, s in med.items():
        base = peer[name.split()[0]]
        bare = 'int4 bare' if name.startswith('int4') else 'fp32 merged all 7'
        print(f"{name:20s} {1 / s:7.1f} tok/s   {1000 * s:6.2f} ms/token   "
              f"x{s / base:.3f} of {bare.rsplit(' all', 1)[0]}"
              f"   (fastest round: x{best[name] / best[bare]:.3f})")


if __name__ == "__main__":
    main()
