"""Every numba.cuda kernel against its NumPy reference, tiny shapes (attention over the paged KV cache:
test_cuda_attention.py). Run by test_cuda_sim.py under Numba's CUDA simulator (CI) and by bench/gpu_check.py on a
GPU: NUMBA_ENABLE_CUDASIM must be set before numba.cuda is first imported, so these tests run in a process of their
own (TINYHUN_CUDA_TESTS=1)."""
import os

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tinyhun.kernels import cuda_ref, q4, q8
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
    return type(host)(*(device_linear(f) if isinstance(f, tuple) else dev(f) for f in host))


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


# every format with every row path (T, GEMV rows per warp; T = 6: the GEMM) and every epilogue, each pair of the
# three once (a Latin square: the format's dot, the row path and the epilogue are independent branches)
LINEAR_CASES = [(fmt, *rows, epi) for i, fmt in enumerate(["f16", "q4", "q4-asym-g64"])
                for j, rows in enumerate([(1, 1), (3, 8), (6, None)])
                for epi in [["plain", "norm+resid", "norm+pairs"][(i + j) % 3]]]


@pytest.mark.parametrize("fmt, T, rpw, epilogue", LINEAR_CASES)
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


def adapted(rng, fmt, rows, ranks, K, interleave=False):
    """A stacked device linear of parts with `rows` rows each, part i with a LoRA side path of rank ranks[i] (0:
    none); with the host parts' merged float32 weights (base + scale * B @ A) for the reference."""
    from tinyhun.kernels.linear import side_path
    parts, merged = [], []
    for n, r in zip(rows, ranks):
        w = (rng.standard_normal((n, K)) * 0.3).astype(f32)
        base = as_linear(FORMATS[fmt](w))
        want = cuda_ref.dense(cuda_ref.device_format(base))
        if r:
            a, b, scale = rng.standard_normal((r, K)) * 0.2, rng.standard_normal((n, r)) * 0.2, 2.0 / r
            lin = side_path(base, a, b, scale, half=True)
            a16, b16 = (m.astype(np.float16).astype(f32) for m in (a, b))   # the powers of two are exact
            want = want + f32(scale) * (b16 @ a16)
            base = lin
        parts.append(cuda_ref.device_format(base))
        merged.append(want)
    stacked = cuda_ref.stack(parts, interleave)
    return stacked, cuda_ref.joiner(interleave)(merged)


def test_side_path_reference_is_the_merged_weight():
    """A stacked side path (q adapted at rank 4, k not, v at rank 2; gate and up interleaved at ranks 3 and 1)
    multiplies as the parts' merged weights would: B @ A of each part in its own rows, nothing across parts."""
    rng = np.random.default_rng(9)
    for rows, ranks, inter in (((16, 8, 8), (4, 0, 2), False), ((12, 12), (3, 1), True)):
        w, merged = adapted(rng, "q4", rows, ranks, 64, inter)
        assert isinstance(w, cuda_ref.Adapted) and w.side.a.w.shape == (sum(r > 0 for r in ranks) * max(ranks), 64)
        assert np.allclose(cuda_ref.dense(w), merged, rtol=1e-5, atol=1e-6)
        x = rng.standard_normal((3, 64)).astype(f32)
        got = cuda_ref.linear(np.zeros((3, sum(rows)), f32), x, w)
        assert np.allclose(got, x @ merged.T, rtol=1e-4, atol=1e-5)


# (format, rows of x, parts' rows, their ranks, epilogue): QKV-like stacks and a gate/up pair, GEMV and GEMM
SIDE_CASES = [("q4", 1, (16, 8, 8), (4, 0, 2), "norm"), ("q4-asym-g64", 3, (38,), (3,), "resid"),
              ("f16", 2, (19, 19), (2, 4), "norm+pairs"), ("q4", 6, (16, 8, 8), (3, 4, 0), "norm"),
              ("q4", 7, (17, 17), (4, 4), "norm+pairs"), ("f16", 5, (21,), (2,), "resid")]


@pytest.mark.parametrize("fmt, T, rows, ranks, epilogue", SIDE_CASES)
def test_linear_with_a_side_path(fmt, T, rows, ranks, epilogue):
    """An Adapted linear: the A pass into the side scratch, then the base's GEMV (T <= 4) or GEMM adding each
    row's B . t before its epilogue."""
    from tinyhun.kernels import cuda_linear
    rng = np.random.default_rng(T * 10 + len(rows))
    K = 128 if fmt == "q4-asym-g64" else 64
    pairs = "pairs" in epilogue
    w, _ = adapted(rng, fmt, rows, ranks, K, pairs)
    N = sum(rows)
    x = rng.standard_normal((T, K)).astype(f32)
    kw = {"pairs": pairs}
    if "norm" in epilogue:
        kw.update(norm=(1 + 0.1 * rng.standard_normal(K)).astype(f32), eps=1e-5)
    if "resid" in epilogue:
        kw["resid"] = rng.standard_normal((T, N)).astype(f32)
    want = cuda_ref.linear(np.zeros((T, N // 2 if pairs else N), f32), x, w, **kw)
    out = dev(np.zeros_like(want))
    side = dev(np.full(T * 3 * K, np.nan, f32))   # stale scratch: a read past the computed t would show
    cuda_linear.linear(out, dev(x), device_linear(w), **{k: dev(v) for k, v in kw.items()}, side=side)
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


@settings(max_examples=4, deadline=None)
@given(st.integers(1, 3), st.integers(1, 700), st.integers(0, 2**32 - 1))
@example(2, 600, 0)   # V past the block's 256 threads, so threads scan several values
def test_argmax_rows(T, V, seed):
    """The greedy pick equals np.argmax, ties to the lowest index: values drawn from a few levels (ties everywhere),
    one row all equal, one with -inf entries (never lost as "seen nothing")."""
    from tinyhun.kernels import cuda_linear
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 3, (T, V)).astype(f32)
    x[0] = 1.5 if T > 1 else x[0]
    x[-1, rng.integers(0, V, 3)] = -np.inf
    out = dev(np.full(T, -1, np.int64))
    cuda_linear.argmax_rows(out, dev(x))
    assert np.array_equal(out.copy_to_host(), cuda_ref.argmax_rows(np.zeros(T, np.int64), x))


@pytest.mark.parametrize("fmt", ["f16", "q4-asym-g64"])
def test_embed_rows(fmt):
    from tinyhun.kernels import cuda_linear
    rng = np.random.default_rng(3)
    w = matrix(rng, fmt, 20, 128)
    ids = np.array([19, 0, 7, 7])
    out = dev(np.zeros((4, 128), f32))
    cuda_linear.embed_rows(out, device_linear(w), dev(ids))
    assert np.array_equal(out.copy_to_host(), cuda_ref.embed_rows(np.zeros((4, 128), f32), w, ids))


# ---- mixture of experts ----

def moe_layer(rng, fmt, E, H, Ie, shared_width=None):
    """The stacked host experts (kernels.moe.stack_linears) of a random layer and a shared MLP of width
    shared_width (None: none)."""
    from tinyhun.kernels import moe
    from tinyhun.structs import DenseMLP

    def lin(n, k):
        return as_linear(FORMATS[fmt]((rng.standard_normal((n, k)) * 0.3).astype(f32)))
    gate, up, down = (moe.stack_linears([lin(n, k) for _ in range(E)]) for n, k in ((Ie, H), (Ie, H), (H, Ie)))
    shared = None if shared_width is None else DenseMLP(lin(shared_width, H), lin(shared_width, H),
                                                        lin(H, shared_width))
    return gate, up, down, shared


def poisoned(ex, e):
    """Experts with expert e's weights (fp16 values, or INT4 scales) all NaN."""
    groups = ex.n_experts + ex.shared
    for w in (ex.gate_up, ex.down):
        n = cuda_ref.shape(w)[0] // groups
        (w.w if isinstance(w, cuda_ref.H16) else w.scales)[e * n:(e + 1) * n] = np.nan
    return ex


def device_experts(host):
    return host._replace(gate_up=device_linear(host.gate_up), down=device_linear(host.down))


@settings(max_examples=3, deadline=None)
@given(T=st.integers(1, 4), E=st.integers(1, 9), kk=st.integers(1, 9), H=st.sampled_from([8, 40]),
       ties=st.booleans(), seed=st.integers(0, 99))
@example(T=2, E=5, kk=1, H=8, ties=True, seed=0).via("top-1")
@example(T=1, E=4, kk=4, H=40, ties=True, seed=1).via("k = E")
def test_route(T, E, kk, H, ties, seed):
    """RMSNorm + router + softmax + top-k: x of +-1 with unit norm weights normalizes exactly, router entries in
    quarters make every logit exact, so the kernel and the reference see the same logits and duplicated router rows
    tie exactly (the lower index wins)."""
    from tinyhun.kernels import cuda_moe
    k = min(kk, E)
    rng = np.random.default_rng(seed)
    x = rng.choice(np.array([-1.0, 1.0], f32), (T, H))
    router = (rng.integers(-4, 5, (E, H)) / 4).astype(f32)
    if ties:
        router[rng.integers(0, E, E)] = router[rng.integers(0, E, E)]
    norm = np.ones(H, f32)
    ids, w = np.zeros(T * k, np.int64), np.zeros(T * k, f32)
    cuda_ref.route(ids, w, x, router, norm, 0.0)
    di, dw = dev(np.zeros(T * k, np.int64)), dev(np.zeros(T * k, f32))
    cuda_moe.route(di, dw, dev(x), dev(router), dev(norm), 0.0)
    assert np.array_equal(di.copy_to_host(), ids)
    np.testing.assert_allclose(dw.copy_to_host(), w, rtol=1e-5)


@settings(max_examples=5, deadline=None)
@given(T=st.integers(5, 40), E=st.integers(1, 6), kk=st.integers(1, 6), shared=st.booleans(), seed=st.integers(0, 99))
def test_group_rows(T, E, kk, shared, seed):
    """A prefill's assignments sorted by expert on the device (stable) and its table of BM-row tiles."""
    from tinyhun.kernels import cuda_moe
    k = min(kk, E)
    rng = np.random.default_rng(seed)
    ids = np.concatenate([rng.permutation(E)[:k] for _ in range(T)])
    groups, width = E + shared, k + shared
    n = cuda_moe.n_tiles(T, width, groups)
    order, tiles = np.zeros(T * width, np.int64), np.zeros((n, 3), np.int64)
    cuda_ref.group_rows(order, tiles, ids, groups, width)
    do, dt = dev(np.zeros_like(order)), dev(np.full_like(tiles, 7))
    cuda_moe.group_rows(do, dt, dev(ids), groups, width)
    assert np.array_equal(do.copy_to_host(), order) and np.array_equal(dt.copy_to_host(), tiles)


@pytest.mark.parametrize("fmt, T, shared", [("f16", 1, "stacked"), ("q4", 3, "apart"), ("q4-asym-g64", 5, None)])
def test_experts(fmt, T, shared):
    """experts_up then experts_down: decode rows (T <= 4, GEMVs over the picked experts' rows) and a prefill (the
    rows grouped by expert, tiled GEMMs, the weighted combine); the shared MLP stacked as expert E, or apart (its
    width differs) and then not in the launch. Expert 1 holds NaN weights and no row picks it: nothing of it may
    reach the output. (test_cuda_model.py runs the prefill with the shared MLP stacked, fp16 and INT4.)"""
    from tinyhun.kernels import cuda_moe
    rng = np.random.default_rng(5)
    E, k, H, Ie = 4, 2, (64 if fmt == "q4-asym-g64" else 32), (64 if fmt == "q4-asym-g64" else 32)
    layer = moe_layer(rng, fmt, E, H, Ie, {"stacked": Ie, "apart": 2 * Ie, None: None}[shared])
    host, apart = cuda_ref.experts_of(*layer[:3], k, layer[3])
    poisoned(host, 1)
    assert host.shared == (shared == "stacked") and (apart is not None) == (shared == "apart")
    ids = np.concatenate([rng.choice([0, 2, 3], k, replace=False) for _ in range(T)])
    weights = rng.dirichlet(np.ones(k), T).astype(f32).reshape(-1)
    x, resid = rng.standard_normal((2, T, H)).astype(f32)
    norm = (1 + 0.1 * rng.standard_normal(H)).astype(f32)
    kk = k + host.shared
    h = cuda_ref.experts_up(np.zeros((T * kk, Ie), f32), x, host, ids, norm, 1e-5)
    want = cuda_ref.experts_down(np.zeros((T, H), f32), h, host, ids, weights, resid)
    assert np.isfinite(want).all()
    ex = device_experts(host)
    sc = cuda_moe.MoEScratch(__import__("numba").cuda, T, H, k, kk, Ie, E + host.shared)
    dids, dw, dh, dx = dev(ids), dev(weights), dev(np.zeros((T * kk, Ie), f32)), dev(resid)
    cuda_moe.experts_up(dh, dev(x), ex, dids, dev(norm), 1e-5, sc)
    close(dh.copy_to_host(), h)
    cuda_moe.experts_down(dx, dh, ex, dids, dw, dx, sc)   # the residual add in place, as the backend runs it
    close(dx.copy_to_host(), want)
