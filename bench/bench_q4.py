"""INT4 matmul speed at Hunyuan-0.5B shapes, weights cold (from DRAM), against the machine's read bandwidth.

    pytest bench/bench_q4.py          # pytest-benchmark tables + an "achieved bandwidth" summary
    python bench/bench_q4.py          # the same figures as one small table

Decode (T = 1) is bound by how fast the weights stream in: each call reads a different copy of the weight, from
enough copies to exceed twice the L3, and GB/s counts the bytes the kernel must read (packed codes + fp16 scales;
fp32 weights for NumPy's GEMV, shown for scale). Prefill (T = 128) is compute-bound and reported in GMAC/s.
pytest-benchmark's times are per pass through all the copies; the summary divides by the number of copies.
GB/s comes from the fastest pass, set against the fastest bandwidth pass (bandwidth.time_cycles says why).
Other jobs may share the cores: compare figures from one run, and rerun when `uptime` shows a quiet machine.
"""
import numpy as np
import pytest

from bandwidth import BestBandwidth, cold_copies, time_cycles
from tinyhun.kernels import q4, q4_cpu

SHAPES = [(2048, 1024), (1024, 1024), (3584, 1024), (1024, 3584), (120818, 1024)]   # N x K; last = lm_head
LARGE = {(3584, 1024), (1024, 3584), (120818, 1024)}
TARGET = 60   # % of the read bandwidth the INT4 GEMV should reach on the LARGE shapes
PREFILL_T = 128


def random_q4(n, k, group=32):
    """A Q4Weight with random codes and scales: the kernel's speed does not depend on the values."""
    rng = np.random.default_rng(n + k)
    tiles = -(-n // q4.TILE)
    packed = rng.integers(0, 256, (tiles, k // 8, 64), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (tiles, k // group, q4.TILE)).astype(np.float16)
    return q4.Q4Weight(packed, scales, None, n, k, group)


def q4_case(n, k, t=1):
    """(fn, cold weight copies, bytes per call) for tinyhun's INT4 matmul on x[t, k]."""
    w = random_q4(n, k)
    x = np.random.default_rng(0).standard_normal((t, k)).astype(np.float32)
    out, buf = np.empty((t, n), np.float32), q4.Q8Acts.empty(t, k)
    copies = cold_copies(lambda: q4.Q4Weight(w.packed.copy(), w.scales.copy(), None, n, k, w.group), w.nbytes)
    return (lambda wq: q4_cpu.matmul_q4(out, x, wq, buf)), copies, w.nbytes


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
@pytest.mark.parametrize("kind", ["int4", "fp32"])
def test_gemv(benchmark, read_bw, report, kind, shape):
    case = (q4_case if kind == "int4" else fp32_case)(*shape)
    bw = read_bw.measure()
    seconds, nbytes = _run(benchmark, case)
    gbs, pct = nbytes / seconds / 1e9, 100 * nbytes / seconds / bw
    benchmark.extra_info.update({"GB/s": round(gbs, 2), "% of read bandwidth": round(pct, 1)})
    short = kind == "int4" and shape in LARGE and pct < TARGET
    report(f"gemv {kind:4} {shape[0]:>6}x{shape[1]:<4}  {seconds * 1e6:9.1f} us  {gbs:5.1f} GB/s  "
           f"{pct:5.1f} % of {bw / 1e9:.1f} GB/s read" + (f"  (below the {TARGET} % target)" if short else ""))
    # only the lm_head fails the run: the ~100 us calls of the 2 MB shapes swing by +-15 % with other jobs
    if short and shape == SHAPES[-1]:
        pytest.fail(f"INT4 GEMV reached {pct:.0f} % of the read bandwidth (target {TARGET} %); is the machine busy?")


@pytest.mark.parametrize("kind", ["int4", "fp32"])
def test_prefill(benchmark, report, kind):
    n, k = 3584, 1024
    seconds, _ = _run(benchmark, (q4_case if kind == "int4" else fp32_case)(n, k, PREFILL_T))
    report(f"prefill {kind:4} T={PREFILL_T} {n}x{k}  {seconds * 1e3:7.2f} ms  "
           f"{PREFILL_T * n * k / seconds / 1e9:6.1f} GMAC/s")


def main():
    bw = BestBandwidth()
    print("us per call: best pass (median pass); GB/s and % of the best read bandwidth so far, from the best pass")
    print(f"{'N x K':>12} | {'INT4 us':>16} {'GB/s':>5} {'% bw':>5} | {'fp32 us':>16} {'GB/s':>5} | "
          f"{'read GB/s':>9} | INT4 speed-up")
    for n, k in SHAPES:
        (f4, w4, b4), (f32, w32, b32) = q4_case(n, k), fp32_case(n, k)
        best = bw.measure()
        (t4, m4), (t32, m32) = time_cycles(f4, w4), time_cycles(f32, w32)
        del w4, w32
        print(f"{n:>6}x{k:<5} | {t4 * 1e6:7.1f} ({m4 * 1e6:7.1f}) {b4 / t4 / 1e9:5.1f} {100 * b4 / t4 / best:5.1f} | "
              f"{t32 * 1e6:7.1f} ({m32 * 1e6:7.1f}) {b32 / t32 / 1e9:5.1f} | {best / 1e9:9.1f} | {t32 / t4:5.1f}x")
    print(f"best read bandwidth (STREAM-style, 1 GiB, all cores) in this run: {bw.measure() / 1e9:.1f} GB/s")
    n, k = 3584, 1024
    for name, case in (("INT4", q4_case), ("fp32", fp32_case)):
        fn, ws, _ = case(n, k, PREFILL_T)
        t, m = time_cycles(fn, ws[:8])
        print(f"prefill {name} T={PREFILL_T} {n}x{k}: {t * 1e3:.2f} ms ({m * 1e3:.2f}), "
              f"{PREFILL_T * n * k / t / 1e9:.1f} GMAC/s")


if __name__ == "__main__":
    main()
