"""INT4 (q4_tiled16) and INT8 (q8_tiled16) matmul speed, weights cold (from DRAM), against the read bandwidth.

    pytest bench/bench_quant.py               # pytest-benchmark tables + an "achieved bandwidth" summary
    pytest bench/bench_quant.py -k int4       # one format (int4, int8, fp32)
    python bench/bench_quant.py [int4|int8]   # the same figures as one small table per format

Decode (T = 1) is bound by how fast the weights stream in: each call reads a different copy of the weight, from
enough copies to exceed twice the L3, and GB/s counts the bytes the kernel must read (codes + fp16 scales; fp32
weights for NumPy's GEMV, shown for scale). INT4 runs at Hunyuan-0.5B shapes, INT8 at lm_head shapes. Prefill
(T = 128) is compute-bound and reported in GMAC/s.
pytest-benchmark's times are per pass through all the copies; the summary divides by the number of copies.
GB/s comes from the fastest pass, set against the fastest bandwidth pass (bandwidth.time_cycles says why).
Other jobs may share the cores: compare figures from one run, and rerun when `uptime` shows a quiet machine.
"""
import sys
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest

from bandwidth import BestBandwidth, cold_copies, time_cycles
from tinyhun.kernels import q4, q4_cpu, q8, q8_cpu

PREFILL_T = 128
PREFILL_SHAPE = (3584, 1024)


def random_q4(n, k, group=32):
    """A Q4Weight with random codes and scales: the kernel's speed does not depend on the values."""
    rng = np.random.default_rng(n + k)
    tiles = -(-n // q4.TILE)
    packed = rng.integers(0, 256, (tiles, k // 8, 64), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (tiles, k // group, q4.TILE)).astype(np.float16)
    return q4.Q4Weight(packed, scales, None, n, k, group)


def random_q8(n, k):
    """A Q8Weight with random codes and scales: the kernel's speed does not depend on the values."""
    rng = np.random.default_rng(n + k)
    tiles = -(-n // q4.TILE)
    packed = rng.integers(-127, 128, (tiles, k // 4, 64), dtype=np.int8)
    scales = rng.uniform(1e-3, 1e-2, (tiles, k // q8.BLOCK, q4.TILE)).astype(np.float16)
    return q8.Q8Weight(packed, scales, n, k)


def _quant_case(w, copy, matmul, t):
    """(fn, cold weight copies, bytes per call) for a quantized matmul of weight w on x[t, k]."""
    x = np.random.default_rng(0).standard_normal((t, w.k)).astype(np.float32)
    out, buf = np.empty((t, w.n), np.float32), q4.Q8Acts.empty(t, w.k)
    return (lambda wq: matmul(out, x, wq, buf)), cold_copies(lambda: copy(w), w.nbytes), w.nbytes


def q4_case(n, k, t=1):
    return _quant_case(random_q4(n, k), lambda w: q4.Q4Weight(w.packed.copy(), w.scales.copy(), None, n, k, w.group),
                       q4_cpu.matmul_q4, t)


def q8_case(n, k, t=1):
    return _quant_case(random_q8(n, k), lambda w: q8.Q8Weight(w.packed.copy(), w.scales.copy(), n, k),
                       q8_cpu.matmul_q8, t)


def fp32_case(n, k, t=1):
    """The same for NumPy's fp32 matmul (BLAS) on a [n, k] fp32 weight."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((t, k)).astype(np.float32)
    out = np.empty((t, n), np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    return (lambda wc: np.matmul(x, wc.T, out=out)), cold_copies(w.copy, w.nbytes), w.nbytes


class Format(NamedTuple):
    case: Callable
    shapes: list     # N x K of the GEMVs
    large: set       # the shapes held to `target`
    target: int      # % of the read bandwidth the GEMV should reach on the large shapes
    fails: set       # the large shapes whose shortfall fails the run


# INT4's ~100 us calls of the 2 MB shapes swing by +-15 % with other jobs: only its lm_head fails the run
_Q4_LARGE = {(3584, 1024), (1024, 3584), (120818, 1024)}
_Q8_LARGE = {(49152, 576), (120818, 1024)}   # SmolLM2-135M lm_head, Hunyuan lm_head
FORMATS = {
    "int4": Format(q4_case, [(2048, 1024), (1024, 1024), (3584, 1024), (1024, 3584), (120818, 1024)],
                   _Q4_LARGE, 60, {(120818, 1024)}),
    "int8": Format(q8_case, [(49152, 576), (120818, 1024), (3584, 1024)], _Q8_LARGE, 70, _Q8_LARGE),
}
GEMVS = ([(kind, shape) for kind, f in FORMATS.items() for shape in f.shapes]
         + [("fp32", shape) for shape in dict.fromkeys(s for f in FORMATS.values() for s in f.shapes)])


def _case(kind):
    return FORMATS[kind].case if kind in FORMATS else fp32_case


def _run(benchmark, case):
    """One benchmark round = one pass through the cold copies; returns (best seconds per call, bytes per call)."""
    fn, items, nbytes = case
    fn(items[0])                                           # compile and warm the code before timing
    benchmark.pedantic(lambda: [fn(w) for w in items], rounds=5)
    return benchmark.stats.stats.min / len(items), nbytes


@pytest.mark.parametrize("kind, shape", GEMVS, ids=[f"{kind}-{n}x{k}" for kind, (n, k) in GEMVS])
def test_gemv(benchmark, read_bw, report, kind, shape):
    case = _case(kind)(*shape)
    bw = read_bw.measure()
    seconds, nbytes = _run(benchmark, case)
    gbs, pct = nbytes / seconds / 1e9, 100 * nbytes / seconds / bw
    benchmark.extra_info.update({"GB/s": round(gbs, 2), "% of read bandwidth": round(pct, 1)})
    f = FORMATS.get(kind)
    short = f is not None and shape in f.large and pct < f.target
    report(f"gemv {kind:4} {shape[0]:>6}x{shape[1]:<4}  {seconds * 1e6:9.1f} us  {gbs:5.1f} GB/s  "
           f"{pct:5.1f} % of {bw / 1e9:.1f} GB/s read" + (f"  (below the {f.target} % target)" if short else ""))
    if short and shape in f.fails:
        pytest.fail(f"{kind.upper()} GEMV reached {pct:.0f} % of the read bandwidth (target {f.target} %); "
                    "is the machine busy?")


@pytest.mark.parametrize("kind", [*FORMATS, "fp32"])
def test_prefill(benchmark, report, kind):
    n, k = PREFILL_SHAPE
    seconds, _ = _run(benchmark, _case(kind)(n, k, PREFILL_T))
    report(f"prefill {kind:4} T={PREFILL_T} {n}x{k}  {seconds * 1e3:7.2f} ms  "
           f"{PREFILL_T * n * k / seconds / 1e9:6.1f} GMAC/s")


def main(kinds):
    bw = BestBandwidth()
    print("us per call: best pass (median pass); GB/s and % of the best read bandwidth so far, from the best pass")
    for kind in kinds:
        name = kind.upper()
        print(f"{'N x K':>12} | {name + ' us':>16} {'GB/s':>5} {'% bw':>5} | {'fp32 us':>16} {'GB/s':>5} | "
              f"{'read GB/s':>9} | {name} speed-up")
        for n, k in FORMATS[kind].shapes:
            (fq, wq, bq), (f32, w32, b32) = FORMATS[kind].case(n, k), fp32_case(n, k)
            best = bw.measure()
            (tq, mq), (t32, m32) = time_cycles(fq, wq), time_cycles(f32, w32)
            del wq, w32
            print(f"{n:>6}x{k:<5} | {tq * 1e6:7.1f} ({mq * 1e6:7.1f}) {bq / tq / 1e9:5.1f} "
                  f"{100 * bq / tq / best:5.1f} | {t32 * 1e6:7.1f} ({m32 * 1e6:7.1f}) {b32 / t32 / 1e9:5.1f} | "
                  f"{best / 1e9:9.1f} | {t32 / tq:5.1f}x")
    print(f"best read bandwidth (STREAM-style, 1 GiB, all cores) in this run: {bw.measure() / 1e9:.1f} GB/s")
    n, k = PREFILL_SHAPE
    for kind in [*kinds, "fp32"]:
        fn, ws, _ = _case(kind)(n, k, PREFILL_T)
        t, m = time_cycles(fn, ws[:8])
        print(f"prefill {kind.upper() if kind in FORMATS else kind} T={PREFILL_T} {n}x{k}: {t * 1e3:.2f} ms "
              f"({m * 1e3:.2f}), {PREFILL_T * n * k / t / 1e9:.1f} GMAC/s")


if __name__ == "__main__":
    main(sys.argv[1:] or list(FORMATS))
