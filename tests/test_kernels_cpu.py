"""Numba CPU kernels equal the NumPy references (tinyhun.kernels.ref / ref_fused) on hypothesis-chosen shapes.

Tolerances are fp32 round-off relative to the magnitude of what is summed: the kernels reassociate sums
(vectorized partial sums) and use their own exp, so results differ from NumPy in the last few bits only.
Each op also runs once on a shape large enough to take its parallel path.
"""
import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyhun.kernels import cpu, cpu_attention, q4, ref, ref_fused, select

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
    assert select("numba") is cpu
    for name, fn in inspect.getmembers(ref, inspect.isfunction):
        if fn.__module__ != ref.__name__:
            continue                              # imported helpers, e.g. q4.matmul_q4
        assert inspect.signature(getattr(cpu, name)) == inspect.signature(fn), name
    assert inspect.signature(cpu.add_rmsnorm) == inspect.signature(ref_fused.add_rmsnorm)


def test_warmup_compiles_every_kernel():
    cpu.warmup()
    entry = (cpu._matmul, cpu._rmsnorm, cpu._add_rmsnorm, cpu._rope, cpu._silu_mul, cpu._add,
             cpu_attention.attention_kernel)   # the kernels Python calls; their callees come with them
    for kernel in entry:
        assert kernel.signatures, f"{kernel.__name__} not compiled by warmup()"
    ndims = {sig[1].ndim for sig in cpu._rmsnorm.signatures}
    assert {2, 3} <= ndims   # [T, H] and per-head [T, nh, d] (other tests may have compiled more)


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


@pytest.mark.parametrize("T", [1, 3])
def test_matmul_int4_weight_goes_to_the_int4_kernel(T):
    rng = np.random.default_rng(T)
    x, w = rand(rng, T, 64), q4.quantize_q4(rand(rng, 40, 64))
    out, want = np.empty((T, 40), f32), np.empty((T, 40), f32)
    assert cpu.matmul(out, x, w) is out
    ref.matmul(want, x, w)
    close(out, want, np.abs(x) @ np.abs(q4.dequantize_q4(w)).T)


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
    ref_fused.add_rmsnorm(want, resid_want, x, w, 1e-6)
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


# ---- attention ------------------------------------------------------------------------------------------------

def check_attention(rng, T, pos, nkv, ratio, d, extra):
    nh, S = nkv * ratio, pos + T + extra
    q = rand(rng, T, nh, d, scale=2.0)
    k, v = rand(rng, nkv, S, d), rand(rng, nkv, S, d)
    k[:, pos + T:] = np.nan          # positions not yet written must never be read
    v[:, pos + T:] = np.nan
    out, want = np.full_like(q, np.nan), np.empty_like(q)
    assert cpu.attention(out, q, k, v, pos) is out
    ref.attention(want, q, k, v, pos)
    close(out, want, np.abs(v[:, :pos + T]).max())


@SETTINGS
@given(T=st.sampled_from([1, 1, 2, 3, 8]), pos=st.integers(0, 300), nkv=st.sampled_from([1, 2, 3]),
       ratio=st.sampled_from([1, 2, 4]), d=st.sampled_from([16, 64, 128]), extra=st.sampled_from([0, 1, 37]),
       seed=st.integers(0, 2**16))
def test_attention(T, pos, nkv, ratio, d, extra, seed):
    check_attention(np.random.default_rng(seed), T, pos, nkv, ratio, d, extra)


@pytest.mark.parametrize("T,pos", [(1, 2047), (70, 0), (33, 100)])
def test_attention_parallel(T, pos):
    check_attention(np.random.default_rng(T), T, pos, 8, 2, 128, 5)


def test_attention_out_may_alias_q():
    rng = np.random.default_rng(0)
    q, k, v = rand(rng, 3, 4, 16), rand(rng, 2, 10, 16), rand(rng, 2, 10, 16)
    want = ref.attention(np.empty_like(q), q, k, v, 5)
    cpu.attention(q, q, k, v, 5)
    close(q, want, np.abs(v).max())


@pytest.mark.parametrize("nh,nkv,S", [(4, 3, 10), (4, 2, 6)])
def test_attention_rejects_bad_shapes(nh, nkv, S):
    q = np.ones((2, nh, 16), f32)
    with pytest.raises(ValueError):
        cpu.attention(np.empty_like(q), q, np.ones((nkv, S, 16), f32), np.ones((nkv, S, 16), f32), 5)


# ---- decoder layer --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm, int4", [(False, False), (True, False), (True, True)])
def test_decoder_layer_prefill_then_decode(qk_norm, int4):
    rng = np.random.default_rng(int(qk_norm))
    H, nh, nkv, d, inter, S, eps = 48, 4, 2, 16, 72, 12, 1e-6

    def norm(n):   # per-head q/k norm weights are empty when the model has none
        return (1 + 0.1 * rand(rng, n)) if qk_norm or n == H else np.zeros(0, f32)

    lw = (norm(H), rand(rng, nh * d, H, scale=0.15), rand(rng, nkv * d, H, scale=0.15),
          rand(rng, nkv * d, H, scale=0.15), norm(d), norm(d), rand(rng, H, nh * d, scale=0.15), norm(H),
          rand(rng, inter, H, scale=0.15), rand(rng, inter, H, scale=0.15), rand(rng, H, inter, scale=0.1))
    if int4:   # every matrix INT4: the whole layer runs as one Numba call on the prepared tuples
        H, nh, d, inter = 64, 4, 16, 96
        lw = tuple(q4.quantize_q4(rand(rng, *w.shape, scale=0.15), 32) if w.ndim == 2 else w for w in (
            norm(H), rand(rng, nh * d, H), rand(rng, nkv * d, H), rand(rng, nkv * d, H), norm(d), norm(d),
            rand(rng, H, nh * d), norm(H), rand(rng, inter, H), rand(rng, inter, H), rand(rng, H, inter)))
    caches = {m: (np.zeros((nkv, S, d), f32), np.zeros((nkv, S, d), f32)) for m in (cpu, ref)}
    x0 = rand(rng, S, H)
    for pos, T in ((0, 7), (7, 1), (8, 1)):
        cos, sin = tables(T, d, pos)
        outs = {}
        for m in (cpu, ref):
            bufs = tuple(np.empty((T, w), f32) for w in (H, nh * d, nkv * d, nkv * d, nh * d, H, inter, inter))
            acts = (np.empty(T * inter, np.int8), *(np.empty(T * inter // 32, t) for t in (f32, np.int32, f32)))
            outs[m] = m.decoder_layer(x0[pos:pos + T].copy(), bufs + (acts,), m.prepare_layer(lw), *caches[m],
                                      pos, cos, sin, (nh, nkv, d), eps)
        rtol = 1e-4 if int4 else 1e-5
        close(outs[cpu], outs[ref], np.abs(outs[ref]).max(), rtol=rtol)
        close(caches[cpu][0], caches[ref][0], np.abs(caches[ref][0]).max(), rtol=rtol)


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


def test_fused_layer_module_imports_on_its_own():
    import subprocess
    import sys
    code = "from tinyhun.kernels import cpu_layer; from tinyhun.kernels import cpu; assert cpu.decoder_layer"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
