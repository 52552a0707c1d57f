"""Numba CPU kernels against the NumPy references at Hunyuan-0.5B decode shapes, timed in the same run.

    pytest bench/bench_kernels.py     # pytest-benchmark tables (one group per case) + a ratio summary
    python bench/bench_kernels.py     # the same cases as one small table

Hunyuan-0.5B: hidden 1024, 16 query / 8 kv heads of 128, MLP 3584. Operands are cache-hot (the weights of one
GEMV fit the 260 MB L3) except in the `cold` GEMV cases, which cycle through enough weight copies to read 2x L3 from
DRAM per pass, as a decoder does. `matmul_blocked` times the Numba T>1 kernel directly against BLAS: the
figures behind `cpu.BLAS_T`. `dispatch` is the cost of calling into Numba at all: a trivial @njit function
on a tiny array, next to a plain Python call and a whole public kernel call on [1, 8]. Other jobs may share the
cores (OpenBLAS's threads suffer most: 4 ms scheduler ticks show up in its times): compare figures from one run,
and rerun when `uptime` shows a quiet machine.
"""
import itertools
import time

import numpy as np
import pytest
from numba import njit

from bandwidth import cold_copies
from tinyhun.kernels import cpu, kv, ref

H, NH, NKV, D, INTER = 1024, 16, 8, 128, 3584
f32 = np.float32
_RNG = np.random.default_rng(0)


def rand(*shape):
    return _RNG.standard_normal(shape, dtype=f32)


def rope_tables(pos, d=D):
    ang = pos * 10000.0 ** (-np.arange(0, d, 2) / d)
    return np.cos(ang)[None].astype(f32), np.sin(ang)[None].astype(f32)   # [1, d/2]: rotation, norm-preserving


def decode_attention(ctx, kind):
    # one token at position ctx - 1 over a paged cache of ctx positions (kernels/kv.py, blocks of kv.BLOCK)
    nb = -(-ctx // kv.BLOCK)
    pool = kv.allocate(np.zeros, 1, nb, NKV, D, kind)[0]
    tables = np.arange(nb, dtype=np.int32)[None]
    slots, positions = np.zeros(ctx, np.int64), np.arange(ctx)
    cpu.store_kv(pool, rand(ctx, NKV, D), rand(ctx, NKV, D), tables, slots, positions)
    return np.empty((1, NH, D), f32), rand(1, NH, D), pool, tables, slots[:1], positions[-1:]


# case -> (numba fn, numpy fn, args factory)
CASES = {
    "rmsnorm[1,1024]": (cpu.rmsnorm, ref.rmsnorm, lambda: (np.empty((1, H), f32), rand(1, H), rand(H), 1e-6)),
    "add_rmsnorm[1,1024]": (cpu.add_rmsnorm, ref.add_rmsnorm,
                            lambda: (np.empty((1, H), f32), rand(1, H), rand(1, H) * 1e-3, rand(H), 1e-6)),
    "rope q[1,16,128]": (cpu.rope, ref.rope, lambda: (rand(1, NH, D), *rope_tables(300))),
    "attention ctx512": (cpu.attention_rows, ref.attention_rows, lambda: decode_attention(512, "fp32")),
    "attention ctx2048": (cpu.attention_rows, ref.attention_rows, lambda: decode_attention(2048, "fp32")),
    "attention ctx2048 fp16": (cpu.attention_rows, ref.attention_rows, lambda: decode_attention(2048, "fp16")),
    "attention ctx2048 int8": (cpu.attention_rows, ref.attention_rows, lambda: decode_attention(2048, "int8")),
    "silu_mul[1,3584]": (cpu.silu_mul, ref.silu_mul,
                         lambda: (np.empty((1, INTER), f32), rand(1, INTER), rand(1, INTER))),
    "add[1,1024]": (cpu.add, ref.add, lambda: (np.empty((1, H), f32), rand(1, H), rand(1, H))),
    "gemv 1024->2048": (cpu.matmul, ref.matmul, lambda: (np.empty((1, 2048), f32), rand(1, H), rand(2048, H))),
    "gemv 3584->1024": (cpu.matmul, ref.matmul, lambda: (np.empty((1, H), f32), rand(1, INTER), rand(H, INTER))),
}
for _T in (4, 16, 32, 64, 128):
    CASES[f"matmul_blocked T={_T} 1024->2048"] = (
        lambda out, x, w: cpu._matmul(out, x, w), ref.matmul,
        lambda T=_T: (np.empty((T, 2048), f32), rand(T, H), rand(2048, H)))
COLD = {"gemv 1024->2048 cold": (2048, H), "gemv 3584->1024 cold": (H, INTER)}

_medians = {}
_cold_weights = {}


def _median(benchmark):
    return benchmark.stats.stats.median if benchmark.stats else None   # None under --benchmark-disable


def _record(report, case, impl, seconds, nbytes=None):
    if seconds is None:
        return
    _medians[case, impl] = seconds
    other = _medians.get((case, "numpy" if impl == "numba" else "numba"))
    if other is not None:
        nb, np_ = _medians[case, "numba"], _medians[case, "numpy"]
        bw = f"  numba {nbytes / nb / 1e9:5.1f} GB/s" if nbytes else ""
        report(f"{case:32} numba {nb * 1e6:9.2f} us   numpy {np_ * 1e6:9.2f} us   numpy/numba {np_ / nb:6.2f}x{bw}")


@pytest.mark.parametrize("impl", ["numba", "numpy"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel(benchmark, report, case, impl):
    fast, slow, make = CASES[case]
    fn, args = (fast if impl == "numba" else slow), make()
    fn(*args)                                   # compile (or load from cache) outside the timing
    benchmark.group = case
    benchmark(fn, *args)
    _record(report, case, impl, _median(benchmark))


@pytest.mark.parametrize("impl", ["numba", "numpy"])
@pytest.mark.parametrize("case", list(COLD))
def test_gemv_cold(benchmark, report, case, impl):
    n, k = COLD[case]
    if case not in _cold_weights:
        w = rand(n, k)
        _cold_weights.clear()                   # one shape's copies (2x L3) at a time
        _cold_weights[case] = cold_copies(w.copy, w.nbytes)
    ws = itertools.cycle(_cold_weights[case])
    fn = cpu.matmul if impl == "numba" else ref.matmul
    out, x = np.empty((1, n), f32), rand(1, k)
    fn(out, x, next(ws))
    benchmark.group = case
    benchmark(lambda: fn(out, x, next(ws)))
    _record(report, case, impl, _median(benchmark), n * k * 4)


@njit(cache=True)
def _noop(a):
    pass


def _py_noop(a):
    pass


_TINY = np.zeros((1, 8), f32)
DISPATCH = {
    "python call": lambda: _py_noop(_TINY),
    "njit no-op call": lambda: _noop(_TINY),
    "cpu.rmsnorm [1,8]": lambda: cpu.rmsnorm(_TINY, _TINY, _TINY[0], 1e-6),
}


@pytest.mark.parametrize("what", list(DISPATCH))
def test_dispatch(benchmark, report, what):
    call = DISPATCH[what]
    call()
    benchmark.group = "dispatch"
    benchmark(call)
    if _median(benchmark) is not None:
        report(f"dispatch: {what:24} {_median(benchmark) * 1e6:6.3f} us (includes a lambda call)")


def _best(fn, args, seconds=0.3):
    # best per-call time over batches sized to ~1 ms
    fn(*args)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        if time.perf_counter() - t0 > 1e-3:
            break
        n *= 2
    best, stop = np.inf, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main():
    print(f"{'case':32} {'numba us':>10} {'numpy us':>10} {'numpy/numba':>12}")
    for case, (fast, slow, make) in CASES.items():
        args = make()
        a, b = _best(fast, args), _best(slow, args)
        print(f"{case:32} {a * 1e6:10.2f} {b * 1e6:10.2f} {b / a:11.2f}x")
    for case, (n, k) in COLD.items():
        w = rand(n, k)
        ws, out, x = cold_copies(w.copy, w.nbytes), np.empty((1, n), f32), rand(1, k)
        a, b = (_best(lambda: fn(out, x, next(cycle)), ()) for fn, cycle in
                ((cpu.matmul, itertools.cycle(ws)), (ref.matmul, itertools.cycle(ws))))
        del ws
        print(f"{case:32} {a * 1e6:10.2f} {b * 1e6:10.2f} {b / a:11.2f}x   numba {w.nbytes / a / 1e9:.1f} GB/s")
    for what, call in DISPATCH.items():
        print(f"dispatch: {what:22} {_best(call, ()) * 1e6:6.3f} us")


if __name__ == "__main__":
    main()
