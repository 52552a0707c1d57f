"""INT8 (q8_tiled16) GEMV speed at lm_head shapes, weights cold (from DRAM), against the machine's read bandwidth.

    pytest bench/bench_q8.py          # pytest-benchmark tables + an "achieved bandwidth" summary
    python bench/bench_q8.py          # the same figures as one small table

Method as bench_q4.py (which see): each call reads a different copy of the weight, from enough copies to exceed
twice the L3; GB/s counts the bytes the kernel must read (int8 codes + fp16 scales; fp32 weights for NumPy's GEMV,
shown for scale), from the fastest pass, set against the fastest bandwidth pass.
"""
import numpy as np
import pytest

from bandwidth import BestBandwidth, cold_copies, time_cycles
from tinyhun.kernels import q4, q8, q8_cpu

SHAPES = [(49152, 576), (120818, 1024), (3584, 1024)]   # N x K: SmolLM2-135M lm_head, Hunyuan lm_head, an MLP
LARGE = {(49152, 576), (120818, 1024)}
TARGET = 70   # % of the read bandwidth the INT8 GEMV should reach on the LARGE shapes
PREFILL_T = 128


def random_q8(n, k):
    """A Q8Weight with random codes and scales: the kernel's speed does not depend on the values."""
    rng = np.random.default_rng(n + k)
    tiles = -(-n // q4.TILE)
    packed = rng.integers(-127, 128, (tiles, k // 4, 64), dtype=np.int8)
    scales = rng.uniform(1e-3, 1e-2, (tiles, k // q8.BLOCK, q4.TILE)).astype(np.float16)
    return q8.Q8Weight(packed, scales, n, k)


def q8_case(n, k, t=1):
    """(fn, cold weight copies, bytes per call) for tinyhun's INT8 matmul on x[t, k]."""
    w = random_q8(n, k)
    x = np.random.default_rng(0).standard_normal((t, k)).astype(np.float32)
    out, buf = np.empty((t, n), np.float32), q4.Q8Acts.empty(t, k)
    copies = cold_copies(lambda: q8.Q8Weight(w.packed.copy(), w.scales.copy(), n, k), w.nbytes)
    return (lambda wq: q8_cpu.matmul_q8(out, x, wq, buf)), copies, w.nbytes


def fp32_case(n, k, t=1):
    """The same for NumPy's fp32 matmul (BLAS) on a [n, k] fp32 weight."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((t, k)).astype(np.float32)
    out = np.empty((t, n), np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    return (lambda wc: np.matmul(x, wc.T, out=out)), cold_copies(w.copy, w.nbytes), w.nbytes


def _run(benchmark, case):
    """One benchmark round = one pass through the cold copies; returns (best seconds per call, bytes per call)."""
    fn, items, nbytes = case
    fn(items[0])                                           # compile and warm the code before timing
    benchmark.pedantic(lambda: [fn(w) for w in items], rounds=5)
    return benchmark.stats.stats.min / len(items), nbytes


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_gemv(benchmark, read_bw, report, kind, shape):
    case = (q8_case if kind == "int8" else fp32_case)(*shape)
    bw = read_bw.measure()
    seconds, nbytes = _run(benchmark, case)
    gbs, pct = nbytes / seconds / 1e9, 100 * nbytes / seconds / bw
    benchmark.extra_info.update({"GB/s": round(gbs, 2), "% of read bandwidth": round(pct, 1)})
    short = kind == "int8" and shape in LARGE and pct < TARGET
    report(f"gemv {kind:4} {shape[0]:>6}x{shape[1]:<4}  {seconds * 1e6:9.1f} us  {gbs:5.1f} GB/s  "
           f"{pct:5.1f} % of {bw / 1e9:.1f} GB/s read" + (f"  (below the {TARGET} % target)" if short else ""))
    if short:
        pytest.fail(f"INT8 GEMV reached {pct:.0f} % of the read bandwidth (target {TARGET} %); is the machine busy?")


@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_prefill(benchmark, report, kind):
    n, k = 3584, 1024
    seconds, _ = _run(benchmark, (q8_case if kind == "int8" else fp32_case)(n, k, PREFILL_T))
    report(f"prefill {kind:4} T={PREFILL_T} {n}x{k}  {seconds * 1e3:7.2f} ms  "
           f"{PREFILL_T * n * k / seconds / 1e9:6.1f} GMAC/s")


def main():
    bw = BestBandwidth()
    print("us per call: best pass (median pass); GB/s and % of the best read bandwidth so far, from the best pass")
    print(f"{'N x K':>12} | {'INT8 us':>16} {'GB/s':>5} {'% bw':>5} | {'fp32 us':>16} {'GB/s':>5} | "
          f"{'read GB/s':>9} | INT8 speed-up")
    for n, k in SHAPES:
        (f8, w8, b8), (f32, w32, b32) = q8_case(n, k), fp32_case(n, k)
        best = bw.measure()
        (t8, m8), (t32, m32) = time_cycles(f8, w8), time_cycles(f32, w32)
        del w8, w32
        print(f"{n:>6}x{k:<5} | {t8 * 1e6:7.1f} ({m8 * 1e6:7.1f}) {b8 / t8 / 1e9:5.1f} {100 * b8 / t8 / best:5.1f} | "
              f"{t32 * 1e6:7.1f} ({m32 * 1e6:7.1f}) {b32 / t32 / 1e9:5.1f} | {best / 1e9:9.1f} | {t32 / t8:5.1f}x")
    print(f"best read bandwidth (STREAM-style, 1 GiB, all cores) in this run: {bw.measure() / 1e9:.1f} GB/s")
    n, k = 3584, 1024
    for name, case in (("INT8", q8_case), ("fp32", fp32_case)):
        fn, ws, _ = case(n, k, PREFILL_T)
        t, m = time_cycles(fn, ws[:8])
        print(f"prefill {name} T={PREFILL_T} {n}x{k}: {t * 1e3:.2f} ms ({m * 1e3:.2f}), "
              f"{PREFILL_T * n * k / t / 1e9:.1f} GMAC/s")


if __name__ == "__main__":
    main()
