"""Batched decode (a few tokens per matmul, T = 1..8) on SmolLM2-135M's shapes: the few-token kernel against the
prefill GEMM it replaced for T = 2..8, weights cold (from DRAM), interleaved in one process.

    python bench/bench_batch_decode.py [--rounds 3]
    python bench/bench_batch_decode.py --model DIR [--rounds 3]   # Model.forward_batch steps instead

With --model (SmolLM2-135M-Instruct INT4, say): ms per forward_batch step for B = 1, 2, 4, 8 rows (B interleaved
within each round, median of the rounds) and total tokens/s against B = 1. The kernel is chosen when the layers
compile, so the old kernels are compared by running this script on a checkout of them, alternating the two.

INT4 asymmetric group 32 (GGUF Q4_1, as SmolLM2's layers) at 576x576, 192x576 (k/v), 1536x576, 576x1536; INT8 at
the lm_head's 49152x576. For each T: us per call (best of the rounds) of the GEMM and of matmul_q*'s dispatch
(the GEMV for T = 1, _gemm_few for 2..8), their ratio, and each one's time per call over the GEMV's at T = 1
(1.0 = a batch of T costs what one token does). Both outputs are checked bit-identical.
Other jobs may share the cores: compare figures from one run only.
"""
import argparse
import statistics
import time

import numpy as np

from bandwidth import cold_copies, time_cycles
from bench_quant import random_q8
from tinyhun.kernels import q4, q4_cpu, q8, q8_cpu

Q4_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
Q8_SHAPES = [(49152, 576)]
TOKENS = (1, 2, 4, 8)


def random_q4_1(n, k):
    """An asymmetric group-32 Q4Weight (GGUF Q4_1) with random codes, scales and mins."""
    rng = np.random.default_rng(n + k)
    tiles = -(-n // q4.TILE)
    packed = rng.integers(0, 256, (tiles, k // 8, 64), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (tiles, k // 32, q4.TILE)).astype(np.float16)
    mins = rng.uniform(-0.1, 0, (tiles, k // 32, q4.TILE)).astype(np.float16)
    return q4.Q4Weight(packed, scales, mins, n, k, 32)


def q4_pair(w, t):
    """(gemm on weight copy, dispatch on weight copy, cold copies) for x[t, K]."""
    x = np.random.default_rng(t).standard_normal((t, w.k)).astype(np.float32)
    buf, out_a, out_b = q4.Q8Acts.empty(t, w.k), np.empty((t, w.n), np.float32), np.empty((t, w.n), np.float32)
    copies = cold_copies(lambda: q4.Q4Weight(w.packed.copy(), w.scales.copy(), w.mins.copy(), w.n, w.k, 32),
                         w.nbytes)
    old = q4_cpu._gemv if t == 1 else q4_cpu._gemm

    def gemm(c):
        old(out_a, x, *q4_cpu._flat(buf), c.packed, c.scales.view(np.uint16), c.mins.view(np.uint16), False)

    return gemm, (lambda c: q4_cpu.matmul_q4(out_b, x, c, buf)), copies, (out_a, out_b)


def q8_pair(w, t):
    x = np.random.default_rng(t).standard_normal((t, w.k)).astype(np.float32)
    buf, out_a, out_b = q4.Q8Acts.empty(t, w.k), np.empty((t, w.n), np.float32), np.empty((t, w.n), np.float32)
    copies = cold_copies(lambda: q8.Q8Weight(w.packed.copy(), w.scales.copy(), w.n, w.k), w.nbytes)
    old = q8_cpu._gemv if t == 1 else q8_cpu._gemm

    def gemm(c):
        old(out_a, x, *q4_cpu._flat(buf), c.packed, c.scales.view(np.uint16))

    return gemm, (lambda c: q8_cpu.matmul_q8(out_b, x, c, buf)), copies, (out_a, out_b)


def main(rounds):
    print(f"us per call, best of {rounds} interleaved rounds; 'xT1' = time over the same kernel family's T = 1")
    print(f"{'kind':4} {'N x K':>11} {'T':>2} | {'GEMM us':>8} {'xT1':>5} | {'new us':>8} {'xT1':>5} | "
          f"{'GEMM/new':>8} | bit-identical")
    cases = [("int4", random_q4_1(*s), q4_pair) for s in Q4_SHAPES] + [("int8", random_q8(*s), q8_pair)
                                                                       for s in Q8_SHAPES]
    for kind, w, pair in cases:
        base = None
        for t in TOKENS:
            gemm, new, copies, (out_a, out_b) = pair(w, t)
            best_a, best_b = [], []
            for _ in range(rounds):
                best_a.append(time_cycles(gemm, copies, cycles=3)[0])
                best_b.append(time_cycles(new, copies, cycles=3)[0])
            a, b = min(best_a), min(best_b)
            gemm(copies[0])
            new(copies[0])
            base = base or a
            print(f"{kind:4} {w.n:>5}x{w.k:<5} {t:>2} | {a * 1e6:8.1f} {a / base:5.2f} | {b * 1e6:8.1f} "
                  f"{b / base:5.2f} | {a / b:8.2f} | {np.array_equal(out_a, out_b)}")
            del copies


def model_steps(path, rounds, steps=16, batches=(1, 2, 4, 8)):
    import tinyhun
    model = tinyhun.load(path)
    caches = {b: model.new_caches(b, 64 + rounds * steps) for b in batches}
    for cs in caches.values():
        for i, c in enumerate(cs):
            model.forward(c, [1 + i, 2, 3, 4])
    times = {b: [] for b in batches}
    for r in range(rounds + 1):                       # round 0 compiles and warms
        for b in batches:
            tokens = list(range(5, 5 + b))
            t0 = time.perf_counter()
            for _ in range(steps):
                model.forward_batch(caches[b], tokens)
            if r:
                times[b].append((time.perf_counter() - t0) / steps)
    ms = {b: statistics.median(t) * 1e3 for b, t in times.items()}
    print(f"forward_batch step, median of {rounds} rounds of {steps} steps:")
    for b in batches:
        print(f"  B={b}: {ms[b]:6.2f} ms/step  {b * 1e3 / ms[b]:7.1f} tok/s total  "
              f"{b * ms[batches[0]] / ms[b]:4.2f}x B=1's tok/s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", help="a converted model folder: time Model.forward_batch steps instead")
    a = p.parse_args()
    model_steps(a.model, a.rounds) if a.model else main(a.rounds)
