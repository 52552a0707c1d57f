"""Every numba.cuda kernel against its NumPy reference, tiny shapes. Run by test_cuda_sim.py under Numba's CUDA
simulator (CI) and by bench/gpu_check.py on a GPU: NUMBA_ENABLE_CUDASIM must be set before numba.cuda is first
imported, so these tests run in a process of their own (TINYHUN_CUDA_TESTS=1)."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyhun.kernels import cuda_ref, q4, q8, ref
from tinyhun.kernels.linear import as_linear

pytestmark = pytest.mark.skipif(os.environ.get("TINYHUN_CUDA_TESTS") != "1",
                                reason="run by test_cuda_sim.py (simulator subprocess) or bench/gpu_check.py")
f32 = np.float32
FORMATS = {"f16": lambda w: w, "q4": lambda w: q4.quantize_q4(w, 32),
           "q4-asym-g64": lambda w: q4.quantize_q4(w, 64, False)}


def dev(a):
    from numba import cuda
    return cuda.to_device(a) if isinstance(a, np.ndarray) else a


def device_linear(host):
    return type(host)(*(dev(f) for f in host))


def matrix(rng, fmt, n, k):
    return cuda_ref.device_format(as_linear(FORMATS[fmt]((rng.standard_normal((n, k)) * 0.3).astype(f32))))


def close(got, want, rel=2e-6):
    # fp32 summation order only: a few ulps of the largest magnitude per K terms
    assert np.abs(got - want).max() <= rel * max(1.0, float(np.abs(want).max())) * 64


def test_r4_is_the_q4_layout_regathered():
    rng = np.random.default_rng(0)
    for sym, group in ((True, 32), (False, 128)):
        w = q4.quantize_q4(rng.standard_normal((21, 128)).astype(f32), group, sym)
        assert np.array_equal(cuda_ref.dense(cuda_ref.r4_of(as_linear(w))), q4.dequantize_q4(w))


def test_stack_concatenates_and_interleaves():
    rng = np.random.default_rng(1)
    a, b = matrix(rng, "q4", 16, 64), matrix(rng, "q4", 16, 64)
    da, db = cuda_ref.dense(a), cuda_ref.dense(b)
    assert np.array_equal(cuda_ref.dense(cuda_ref.stack([a, b])), np.concatenate([da, db]))
    inter = cuda_ref.dense(cuda_ref.stack([a, b], interleave=True))
    assert np.array_equal(inter[0::2], da) and np.array_equal(inter[1::2], db)
    w8 = q8.quantize_q8(rng.standard_normal((8, 64)).astype(f32))   # INT8 goes to the device as fp16
    assert np.array_equal(cuda_ref.dense(cuda_ref.device_format(as_linear(w8))),
                          q8.dequantize_q8(w8).astype(np.float16).astype(f32))
    mixed = cuda_ref.stack([a, matrix(rng, "f16", 8, 64)])   # formats differ: all fp16
    assert isinstance(mixed, cuda_ref.H16) and mixed.w.shape == (24, 64)


@pytest.mark.parametrize("fmt", ["f16", "q4", "q4-asym-g64"])
@pytest.mark.parametrize("T, rpw", [(1, 1), (3, 8), (6, None)])   # GEMV rows per warp; T = 6: the GEMM
@pytest.mark.parametrize("epilogue", ["plain", "norm+resid", "norm+pairs"])
def test_linear(fmt, T, rpw, epilogue):
    from tinyhun.kernels import cuda_linear
    rng = np.random.default_rng(2)
    N, K = 38, 64 if fmt != "q4-asym-g64" else 128
    w = matrix(rng, fmt, N, K)
    x = rng.standard_normal((T, K)).astype(f32)
    kw = {}
    if "norm" in epilogue:
        kw.update(norm=(1 + 0.1 * rng.standard_normal(K)).astype(f32), eps=1e-5)
    if "resid" in epilogue:
        kw["resid"] = rng.standard_normal((T, N)).astype(f32)
    kw["pairs"] = "pairs" in epilogue
    want = cuda_ref.linear(np.zeros((T, N // 2 if kw["pairs"] else N), f32), x, w, **kw)
    out = dev(np.zeros_like(want))
    cuda_linear.linear(out, dev(x), device_linear(w), **{k: dev(v) for k, v in kw.items()}, rpw=rpw)
    close(out.copy_to_host(), want)


@settings(max_examples=4, deadline=None)
@given(T=st.integers(5, 40), n=st.integers(1, 70), kb=st.integers(1, 3))
def test_gemm_shapes(T, n, kb):
    """The tiled GEMM at shapes that cut its 32 x 32 tiles anywhere, residual fused."""
    from tinyhun.kernels import cuda_linear
    rng = np.random.default_rng(T * 1000 + n)
    w = matrix(rng, "q4", n, 32 * kb)
    x, r = rng.standard_normal((T, 32 * kb)).astype(f32), rng.standard_normal((T, n)).astype(f32)
    want = cuda_ref.linear(np.zeros((T, n), f32), x, w, resid=r)
    out = dev(np.zeros_like(want))
    cuda_linear.linear(out, dev(x), device_linear(w), resid=dev(r))
    close(out.copy_to_host(), want)


@pytest.mark.parametrize("fmt", ["f16", "q4-asym-g64"])
def test_embed_rows(fmt):
    from tinyhun.kernels import cuda_linear
    rng = np.random.default_rng(3)
    w = matrix(rng, fmt, 20, 128)
    ids = np.array([19, 0, 7, 7])
    out = dev(np.zeros((4, 128), f32))
    cuda_linear.embed_rows(out, device_linear(w), dev(ids))
    assert np.array_equal(out.copy_to_host(), cuda_ref.embed_rows(np.zeros((4, 128), f32), w, ids))


def caches(rng, B, nkv, S, d):
    return [rng.standard_normal((B, nkv, S, d)).astype(f32) for _ in range(2)]


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("T", [1, 3])
def test_rope_qk_store(qk_norm, T):
    from tinyhun.kernels import cuda_attention
    rng = np.random.default_rng(4)
    B, nh, nkv, d, S = 2, 4, 2, 16, 12
    qkv = rng.standard_normal((T, (nh + 2 * nkv) * d)).astype(f32)
    cos, sin = rng.standard_normal((2, S, d // 2)).astype(f32)
    slots, positions = np.array([1, 0, 1][:T]), np.array([4, 9, 5][:T])
    norms = [(1 + 0.1 * rng.standard_normal(d)).astype(f32) if qk_norm else np.zeros(0, f32) for _ in range(2)]
    kc, vc = caches(rng, B, nkv, S, d)
    dk, dv, dq = dev(kc), dev(vc), dev(np.zeros((T, nh, d), f32))
    q = cuda_ref.rope_qk_store(np.zeros((T, nh, d), f32), qkv, kc, vc, cos, sin, slots, positions, *norms, 1e-5)
    cuda_attention.rope_qk_store(dq, dev(qkv), dk, dv, dev(cos), dev(sin), dev(slots), dev(positions),
                                 *[dev(n) if n.size else n for n in norms], 1e-5)
    close(dq.copy_to_host(), q)
    close(dk.copy_to_host(), kc)
    assert np.array_equal(dv.copy_to_host(), vc)


@settings(max_examples=3, deadline=None)
@given(T=st.integers(1, 3), group=st.sampled_from([1, 2]), d=st.sampled_from([16, 40]), split=st.sampled_from([3, 256]),
       seed=st.integers(0, 99))
def test_attention_rows(T, group, d, split, seed):
    """GQA decode/prefill rows over the cache, one split or several (with their merge), head dims past a warp."""
    from tinyhun.kernels import cuda_attention
    rng = np.random.default_rng(seed)
    B, nkv, S = 2, 2, 11
    nh = nkv * group
    q = rng.standard_normal((T, nh, d)).astype(f32)
    kc, vc = caches(rng, B, nkv, S, d)
    slots, positions = rng.integers(0, B, T), rng.integers(0, S, T)
    want = ref.attention_rows(np.zeros((T, nh, d), f32), q, kc, vc, slots, positions)
    out = dev(np.zeros((T, nh, d), f32))
    cuda_attention.attention_rows(out, dev(q), dev(kc), dev(vc), dev(slots), dev(positions), split=split)
    close(out.copy_to_host(), want)
