"""Long context on the paged KV cache: decode at depth per KV storage type, the memory of many conversations
sharing a system prompt, and a fresh cache's first token at any context size. INT4 Hunyuan-0.5B shape, random
weights (bench_moe.random_model), nothing written to disk.

    python bench/bench_long_context.py decode [--depths 4096 16384] [--kinds fp16 int8 fp32] [--tokens 16]
    python bench/bench_long_context.py memory [--kind fp16] [--slots 8] [--system 512] [--own 512] [--decode 32]
    python bench/bench_long_context.py first-token [--contexts 512 32768]
    python bench/bench_long_context.py decode --llama-bench PATH --gguf FILE   # adds llama.cpp's `-d` figures

decode: tok/s with N tokens already in the cache, the bytes a token reads (INT4 weights + N tokens' keys and
values) and the share of the machine's read bandwidth (bandwidth.read_bandwidth, same run) that makes: the
roofline of a memory-bound decode. memory: one process per run (peak RSS is per process): `slots` caches whose
prompts share `system` tokens, `own` more each, then `decode` batched steps; prints peak RSS and the pool's blocks.
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import read_bandwidth
from bench_moe import DENSE, random_model

from tinyhun import Model
from tinyhun.bench import bench, peak_rss_mb


def model_of(kind, context):
    base = random_model(DENSE, np.random.default_rng(0))
    return Model(base.config, base.weights, max_context=context, kv_dtype=kind)


@functools.cache   # one llama-bench run per depth, whichever KV kinds tinyhun runs at it
def llama_bench(path, gguf, depth, tokens):
    """llama.cpp's decode tok/s at depth `depth` (its default f16 KV), or None when it does not run.
    llama-bench -o json prints one JSON array on stdout (its log goes to stderr): the test's "avg_ts"."""
    cmd = [path, "-m", gguf, "-p", "0", "-n", str(tokens), "-d", str(depth), "-t", str(os.cpu_count()), "-o", "json"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if p.returncode:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"exit status {p.returncode}: {tail}")
        out = p.stdout[p.stdout.index("["):]   # from the array on, whatever a build prints before it
        test = next(t for t in json.loads(out) if t["n_gen"] == tokens and t["n_depth"] == depth)
        return float(test["avg_ts"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, StopIteration) as e:
        print(f"llama-bench: {e}", file=sys.stderr)
        return None


def decode(args):
    bw = read_bandwidth()
    print(f"read bandwidth {bw / 1e9:.1f} GB/s")
    for kind in args.kinds:
        model = model_of(kind, max(args.depths) + 64)
        bench(model, prompt_tokens=4, gen_tokens=2, repetitions=1, warmup=0)   # compile outside the figures
        for depth in args.depths:
            r = bench(model, prompt_tokens=1, gen_tokens=args.tokens, repetitions=args.repetitions, warmup=0,
                      depth=depth)
            roof = bw / r["bytes_per_token"]
            line = (f"{kind:5s} depth {depth:6d}: {r['decode_tok_s']:6.2f} tok/s, {r['bytes_per_token'] / 1e6:7.1f} "
                    f"MB/token ({r['kv_bytes_per_token'] * depth / 1e6:.0f} MB of KV), roofline {roof:.2f} tok/s, "
                    f"{100 * r['decode_tok_s'] / roof:.0f} % of it")
            if args.llama_bench and args.gguf:
                peer = llama_bench(args.llama_bench, args.gguf, depth, args.tokens)
                if peer:
                    line += f"; llama.cpp {peer:.2f} tok/s, x{r['decode_tok_s'] / peer:.2f}"
            print(line, flush=True)


def memory(args):
    if args.child:
        model = model_of(args.kind, args.system + args.own + args.decode + 8)
        rng = np.random.default_rng(1)
        system = rng.integers(0, model.config.vocab_size, args.system)
        caches = model.new_caches(args.slots)
        t0 = time.perf_counter()
        tokens = []
        for c in caches:
            prompt = np.concatenate([system, rng.integers(0, model.config.vocab_size, args.own)])
            done = c.reuse(list(prompt))
            tokens.append(model.forward(c, prompt[done:], argmax=True))
        for _ in range(args.decode):
            tokens = list(model.forward_batch(caches, tokens, argmax=True))
        pool = model.kv_pool
        print(json.dumps({"kind": args.kind, "peak_rss_mb": peak_rss_mb(), "blocks_used": pool.used,
                          "kv_mb": pool.used * pool.block_bytes / 2**20, "weights_mb": model.weights.nbytes / 2**20,
                          "hit_rate": pool.hit_rate, "seconds": time.perf_counter() - t0}))
        return
    out = subprocess.run([sys.executable, __file__, "memory", "--child", *sys.argv[2:]], capture_output=True,
                         text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(f"{r['kind']}: {args.slots} conversations of {args.system} shared + {args.own} own tokens, {args.decode} "
          f"decoded: peak RSS {r['peak_rss_mb']:.0f} MB (weights {r['weights_mb']:.0f} MB, KV {r['kv_mb']:.0f} MB in "
          f"{r['blocks_used']} blocks), prefix hit rate {r['hit_rate']:.2f}, {r['seconds']:.1f} s")


def first_token(args):
    """Time to first token of `tinyhun generate` at each --context, median of 3 (one process each: the first
    forward of a process is what a user waits for)."""
    model_dir = args.model
    for ctx in args.contexts:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", "from tinyhun.cli import main; main()", "bench", "--model",
                                model_dir, "--context",
                                str(ctx), "--prompt-tokens", "30", "--gen-tokens", "1", "--repetitions", "1",
                                "--json", "--quiet"], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONSAFEPATH": "1"})
            times.append(json.loads(p.stdout)["ttft_s"])
        print(f"context {ctx:6d}: first forward of a 30-token prompt {1000 * sorted(times)[1]:.1f} ms "
              f"({time.perf_counter() - t0:.1f} s for the last process)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--depths", type=int, nargs="+", default=[4096, 16384])
    d.add_argument("--kinds", nargs="+", default=["fp16", "int8", "fp32"])
    d.add_argument("--tokens", type=int, default=16)
    d.add_argument("--repetitions", type=int, default=2)
    d.add_argument("--llama-bench", help="a llama-bench binary, for its decode at the same depths")
    d.add_argument("--gguf", help="the model llama-bench runs (the same shape, Q4_0)")
    m = sub.add_parser("memory")
    m.add_argument("--kind", default="fp16")
    m.add_argument("--slots", type=int, default=8)
    m.add_argument("--system", type=int, default=512)
    m.add_argument("--own", type=int, default=512)
    m.add_argument("--decode", type=int, default=32)
    m.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    f = sub.add_parser("first-token")
    f.add_argument("--model", required=True, help="a model folder (e.g. the default model's)")
    f.add_argument("--contexts", type=int, nargs="+", default=[512, 32768])
    args = p.parse_args()
    {"decode": decode, "memory": memory, "first-token": first_token}[args.what](args)


if __name__ == "__main__":
    main()
