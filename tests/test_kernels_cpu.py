"""Numba CPU kernels equal the NumPy references (tinyhun.kernels.ref) on hypothesis-chosen shapes.

Tolerances are fp32 round-off relative to the magnitude of what is summed: the kernels reassociate sums
(vectorized partial sums) and use their own exp, so results differ from NumPy in the last few bits only.
Each op also runs once on a shape large enough to take its parallel path.
"""
import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from tinyhun.kernels import cpu, linear, q4, q8, ref

RTOL = 1e-5
SETTINGS = settings(max_examples=25, deadline=None)
f32 = np.float32


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(f32)


def close(got, want, scale, rtol=RTOL):
    # |got - want| <= rtol * scale, scale = the magnitude of the terms that produced each value
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= rtol * scale + 1e-30), f"max err {err.max():.3g} vs scale {np.max(scale):.3g}"


def test_same_api_as_reference():
    for name, fn in inspect.getmembers(ref, inspect.isfunction):
        assert inspect.signature(getattr(cpu, name)) == inspect.signature(fn), name


# ---- matmul ---------------------------------------------------------------------------------------------------

def check_matmul(rng, T, K, N):
    x, w = rand(rng, T, K), rand(rng, N, K)
    out = np.full((T, N), np.nan, f32)
    assert cpu.matmul(out, x, w) is out
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    close(out, want, np.abs(x) @ np.abs(w).T)


@SETTINGS
@given(T=st.sampled_from([1, 1, 2, 3, 4, 5, 7, 9, 16, 33, cpu.BLAS_T - 1, cpu.BLAS_T]),
       K=st.integers(1, 300), N=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_matmul(T, K, N, seed):
    check_matmul(np.random.default_rng(seed), T, K, N)


@pytest.mark.parametrize("T", [1, 6, cpu.BLAS_T + 3])
def test_matmul_parallel(T):
    check_matmul(np.random.default_rng(T), T, 1024, 515)


@njit
def _linear_compiled(out, x, w, acts):
    linear.linear(out, x, w, acts)     # inside Numba code the name resolves to the format's kernel


@pytest.mark.parametrize("fmt", ["f32", "q4", "q4-asym", "q8"])
@pytest.mark.parametrize("T", [1, 3, cpu.BLAS_T + 1])
def test_linear_dispatches_on_the_format(fmt, T):
    rng = np.random.default_rng(T)
    x, w = rand(rng, T, 64), rand(rng, 40, 64)
    fw = {"f32": lambda: w, "q4": lambda: q4.quantize_q4(w, 32), "q4-asym": lambda: q4.quantize_q4(w, 32, sym=False),
          "q8": lambda: q8.quantize_q8(w)}[fmt]()
    lin = linear.as_linear(fw)
    dense = w if fmt == "f32" else (q8.dequantize_q8(fw) if fmt == "q8" else q4.dequantize_q4(fw))
    assert lin.shape == (40, 64)
    out, want = np.full((T, 40), np.nan, f32), np.full((T, 40), np.nan, f32)
    linear.linear(want, x, lin, linear.act_scratch(T, 64))          # the NumPy reference
    _linear_compiled(out, x, lin, linear.act_scratch(T, 64))
    close(out, want, np.abs(x) @ np.abs(dense).T)
    rows = np.empty((3, 64), f32)
    lin.rows(rows, np.array([0, 17, 39]))
    np.testing.assert_array_equal(rows, dense[[0, 17, 39]])


# ---- rmsnorm / add_rmsnorm ------------------------------------------------------------------------------------

@SETTINGS
@given(shape=st.sampled_from([(1, 1024), (3, 33), (1, 16, 128), (5, 2, 64), (7, 1), (2, 3, 16)]),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), eps=st.sampled_from([1e-6, 1e-5]), seed=st.integers(0, 2**16))
def test_rmsnorm(shape, scale, eps, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, *shape, scale=scale), rand(rng, shape[-1])
    out, want = np.empty_like(x), np.empty_like(x)
    assert cpu.rmsnorm(out, x, w, eps) is out
    ref.rmsnorm(want, x, w, eps)
    close(out, want, np.abs(want) + 1e-30)


def test_rmsnorm_parallel():
    rng = np.random.default_rng(0)
    x, w = rand(rng, 64, 16, 128), rand(rng, 128)
    out, want = np.empty_like(x), np.empty_like(x)
    cpu.rmsnorm(out, x, w, 1e-6)
    ref.rmsnorm(want, x, w, 1e-6)
    close(out, want, np.abs(want))


@pytest.mark.parametrize("T", [1, 3, 40])
def test_add_rmsnorm(T):
    rng = np.random.default_rng(T)
    x, w, resid = rand(rng, T, 1024), rand(rng, 1024), rand(rng, T, 1024, scale=4.0)
    resid_want = resid.copy()
    out, want = np.empty_like(x), np.empty_like(x)
    assert cpu.add_rmsnorm(out, resid, x, w, 1e-6) is out
    ref.add_rmsnorm(want, resid_want, x, w, 1e-6)
    np.testing.assert_array_equal(resid, resid_want)
    close(out, want, np.abs(want))


# ---- rope -----------------------------------------------------------------------------------------------------

def tables(T, d, pos=0, base=10000.0):
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.outer(np.arange(pos, pos + T), inv)
    return np.cos(ang).astype(f32), np.sin(ang).astype(f32)


@SETTINGS
@given(T=st.sampled_from([1, 2, 5, 64]), nh=st.sampled_from([1, 3, 16]), d=st.sampled_from([16, 64, 128]),
       pos=st.integers(0, 5000), seed=st.integers(0, 2**16))
def test_rope(T, nh, d, pos, seed):
    x = rand(np.random.default_rng(seed), T, nh, d)
    cos, sin = tables(T, d, pos)
    got, want = x.copy(), x.copy()
    assert cpu.rope(got, cos, sin) is got
    ref.rope(want, cos, sin)
    close(got, want, np.abs(x).max(axis=-1, keepdims=True))


# attention and the KV store over the paged cache: tests/test_kv_kernels.py


# ---- elementwise ----------------------------------------------------------------------------------------------

@SETTINGS
@given(shape=st.sampled_from([(1, 3584), (3, 17), (1, 1), (2, 1000), (40, 1024)]),
       scale=st.sampled_from([1.0, 10.0, 120.0]), seed=st.integers(0, 2**16))
def test_silu_mul(shape, scale, seed):
    rng = np.random.default_rng(seed)
    g, u = rand(rng, *shape, scale=scale), rand(rng, *shape)
    out, want = np.empty_like(g), np.empty_like(g)
    with np.errstate(over="ignore"):      # the reference's exp(-g) overflows to inf for g < -88: silu -> -0
        ref.silu_mul(want, g, u)
    scale = np.abs(g * u) + 1e-30
    assert cpu.silu_mul(out, g, u) is out
    close(out, want, scale, rtol=2e-6)
    cpu.silu_mul(g, g, u)                 # out may alias an input
    close(g, want, scale, rtol=2e-6)


@pytest.mark.parametrize("shape", [(1, 1024), (5, 7), (64, 1024)])
def test_add(shape):
    rng = np.random.default_rng(1)
    a, b = rand(rng, *shape), rand(rng, *shape)
    out = np.empty_like(a)
    assert cpu.add(out, a, b) is out
    np.testing.assert_array_equal(out, ref.add(np.empty_like(a), a, b))


def test_kernels_import_nothing_from_the_engine():
    import re
    import subprocess
    import sys
    from pathlib import Path
    for f in Path(cpu.__file__).parent.glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+(tinyhun\b|\.\.)", f.read_text(), re.M), f.name
    # and each kernel module imports on its own
    for name in ("cpu", "q4_cpu", "q8_cpu", "cpu_attention", "cpu_kv", "linear"):
        code = f"import tinyhun.kernels.{name}"
        assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0, name
