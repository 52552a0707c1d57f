"""A mixture of experts against the dense model of the same active size, both INT4, in one run.

    python bench/bench_moe.py [--layers 24] [--prompt-tokens 512] [--repetitions 2] [--rounds 8] [--burst 4]

Dense: Hunyuan-0.5B's shape (hidden 1024, 24 layers, 16/8 heads of 128, MLP 3584, vocab 120818, tied). MoE: the
same attention and vocabulary, every MLP replaced by 16 experts (top-2) and one shared MLP, all 1184 wide, so a token
runs 3 x 1184 = 3552 MLP columns (the dense 3584) while the model holds 17 x 1184 per layer: active parameters
about those of the 0.5B, total about 3.3x. Weights are random INT4 codes (symmetric, group 32; INT8 embedding)
built in memory, through each family's own `sanitize`, never written to disk.

Prints per model: prefill tok/s, decode ms/token, bytes read per decoded token (`Weights.decode_bytes`: for the MoE
only the k experts a token is routed to) and the GB/s that makes; then the MoE/dense ratios (measured interleaved,
so they hold on a shared machine where the absolute figures do not; the best of several runs each), and the
share of experts a prefill hit.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import read_bandwidth

from tinyhun import Model
from tinyhun.bench import timed_run
from tinyhun.families import config_from_dict, family_of
from tinyhun.kernels import q4, q8
from tinyhun.moe_stats import collect

DENSE = dict(model_type="hunyuan_v1_dense", vocab_size=120818, hidden_size=1024, intermediate_size=3584,
             num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
             max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=10000.0,
             rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0})
MOE = {**DENSE, "model_type": "hunyuan_v1_moe", "intermediate_size": 1184, "moe_intermediate_size": 1184,
       "num_experts": 16, "moe_topk": 2, "num_shared_expert": 1}


def random_model(config, rng):
    """A Model of random weights: INT4 matrices, an INT8 embedding, fp32 norms and router."""
    cfg = config_from_dict(config, "bench")
    fam = family_of(cfg)
    shapes = fam.checkpoint_shapes(cfg)
    keep_float = getattr(fam, "FLOAT_MATRICES", ())

    def read(name):
        shape = shapes[name]
        if len(shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name.endswith(keep_float):
            return (0.02 * rng.standard_normal(shape)).astype(np.float32)
        n, k = shape
        tiles = -(-n // 16)
        if name == "model.embed_tokens.weight":   # rows ~0.7: token identity, not attention's average, drives routing
            return q8.Q8Weight(rng.integers(-127, 128, (tiles, k // 4, 64), dtype=np.int8),
                               np.full((tiles, k // 32, 16), 0.01, np.float16), n, k)
        # codes uniform in 0..15: (q - 8) * scale has sd ~4.6 scale ~ 0.02. A sublayer's output projection is
        # 20x smaller, so the residual stays each token's own embedding: with random weights it would otherwise
        # fill with what every token shares, and deep layers would route every token to the same experts
        scale = 0.0002 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.0043
        return q4.Q4Weight(rng.integers(0, 256, (tiles, k // 8, 64), dtype=np.uint8),
                           np.full((tiles, k // 32, 16), scale, np.float16), None, n, k, 32)
    return Model(cfg, fam.sanitize(cfg, read), max_context=4096)


def params(model, active):
    cfg = model.config
    total = sum(int(np.prod(s)) for s in family_of(cfg).checkpoint_shapes(cfg).values())
    if not active or not cfg.has_experts:
        return total
    return total - sum((E - k) * 3 * cfg.hidden_size * Ie
                       for E, k, Ie in zip(cfg.num_experts, cfg.moe_topk, cfg.moe_intermediate_size))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repetitions", type=int, default=2, help="prefills of each model")
    ap.add_argument("--rounds", type=int, default=8, help="alternating decode bursts of each model")
    ap.add_argument("--burst", type=int, default=4, help="tokens per decode burst")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    models = {name: random_model({**c, "num_hidden_layers": args.layers}, rng)
              for name, c in (("dense", DENSE), ("moe", MOE))}
    print(f"built in {time.perf_counter() - t0:.1f} s")
    for name, m in models.items():
        print(f"{name:5}: {params(m, False) / 1e6:7.1f} M parameters, {params(m, True) / 1e6:7.1f} M active per token, "
              f"{m.weights.nbytes / 1e6:7.1f} MB held, {m.weights.decode_bytes / 1e6:6.1f} MB read per decoded token")
    prompt = rng.integers(0, DENSE["vocab_size"], size=args.prompt_tokens)
    t0 = time.perf_counter()
    for m in models.values():                       # warm-up: compiles (or loads from the cache) every kernel
        timed_run(m, prompt[:64], 2)
    print(f"warm-up (compile) {time.perf_counter() - t0:.1f} s")
    pre = {name: [] for name in models}
    for _ in range(args.repetitions):               # interleaved: both see the same machine load
        for name, m in models.items():
            pre[name].append(timed_run(m, prompt, 0)[0])
    # decode in short alternating bursts, the best burst of each: other jobs on the cores only ever add time
    dec = {name: [] for name in models}
    caches = {name: m.new_cache(args.prompt_tokens + args.rounds * args.burst + 1) for name, m in models.items()}
    for name, m in models.items():
        m.forward(caches[name], prompt)
    token = np.zeros(1, np.int64)
    for _ in range(args.rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            for _ in range(args.burst):
                token[0] = int(np.argmax(m.forward(caches[name], token)[0]))
            dec[name].append((time.perf_counter() - t0) / args.burst)
    bw = read_bandwidth(1 << 29)
    print(f"read bandwidth (STREAM-style, same run): {bw / 1e9:.1f} GB/s")
    figures = {}
    for name, m in models.items():
        p, d = min(pre[name]), min(dec[name])
        gbs = m.weights.decode_bytes / d / 1e9
        figures[name] = (p, d)
        print(f"{name:5}: prefill {args.prompt_tokens / p:7.1f} tok/s ({args.prompt_tokens} tokens), decode "
              f"{d * 1e3:6.2f} ms/token (median {np.median(dec[name]) * 1e3:.2f}), {gbs:5.1f} GB/s "
              f"({100 * gbs * 1e9 / bw:.0f} % of the read bandwidth)")
    (pd, dd), (pm, dm) = figures["dense"], figures["moe"]
    active, total = (params(models["moe"], a) / params(models["dense"], a) for a in (True, False))
    print(f"MoE/dense: decode time per token x{dm / dd:.2f} (active params x{active:.2f}, total x{total:.2f}), "
          f"prefill time x{pm / pd:.2f}")
    moe = models["moe"]
    with collect(moe) as stats:
        moe.forward(moe.new_cache(args.prompt_tokens), prompt)
    r = stats.report()
    print(f"a {args.prompt_tokens}-token prefill used {100 * r['experts_used']:.1f} % of the experts "
          f"(min/max tokens per expert in layer 0: {min(r['layers'][0]['load'])}/{max(r['layers'][0]['load'])})")


if __name__ == "__main__":
    main()
