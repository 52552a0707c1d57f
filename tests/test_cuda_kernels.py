"""Every numba.cuda kernel against its NumPy reference, tiny shapes. Run by test_cuda_sim.py under Numba's CUDA
simulator (CI) and by bench/gpu_check.py on a GPU: NUMBA_ENABLE_CUDASIM must be set before numba.cuda is first
imported, so these tests run in a process of their own (TINYHUN_CUDA_TESTS=1)."""
import os

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tinyhun.kernels import cuda_ref, kv, q4, q8
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


# ---- attention over the paged KV cache (kernels/kv.py) ----

def blocks(rng, kind, NB, nkv, bs, d):
    """Host KVBlocks of NB blocks of bs positions in `kind`'s storage, holding random keys and values (what a
    kernel must not touch, or reads)."""
    k, v = ((kv.encode(x, kv.KINDS[kind])) for x in rng.standard_normal((2, NB, nkv, bs, d)).astype(f32))
    none = np.zeros((0, 0, 0), f32)
    return kv.KVBlocks(k[0], v[0], none if k[1] is None else k[1], none if v[1] is None else v[1])


def on_device(host):
    """Host KVBlocks on the device as the backend holds them: fp16 bits as float16."""
    return kv.KVBlocks(*(dev(a.view(np.float16) if a.dtype == np.uint16 else a) if a.size else a for a in host))


def to_host(blocks_, like):
    return kv.KVBlocks(*(b.copy_to_host().view(a.dtype) if a.size else a for a, b in zip(like, blocks_)))


def tables_of(rng, n, per, NB, shared):
    """int32[n, per] block tables of n sequences over NB blocks, in a random order; with `shared`, every sequence's
    first block is sequence 0's (a shared prefix: the blocks are read by several sequences)."""
    t = rng.permutation(NB)[:n * per].reshape(n, per).astype(np.int32)
    if shared:
        t[:, 0] = t[0, 0]
    return t


# each of QK-norm, rows and storage kind with each value of the others
@pytest.mark.parametrize("qk_norm, T, kind", [(False, 1, "fp16"), (True, 3, "fp16"), (True, 1, "int8"),
                                              (False, 3, "int8"), (True, 2, "fp32")])
def test_rope_qk_store(qk_norm, T, kind):
    """Queries rotated (and normed); keys and values stored through the block tables at each row's sequence and
    position (blocks of 4, the rows in three sequences, positions in their 2nd and 3rd blocks), converted as
    kernels.kv.encode does; every other stored value untouched."""
    from tinyhun.kernels import cuda_attention
    rng = np.random.default_rng(4)
    nh, nkv, d, bs, S = 4, 2, 16, 4, 12
    qkv = rng.standard_normal((T, (nh + 2 * nkv) * d)).astype(f32)
    cos, sin = rng.standard_normal((2, S, d // 2)).astype(f32)
    slots, positions = np.array([1, 0, 2][:T]), np.array([5, 9, 6][:T])
    tables = tables_of(rng, 3, 3, 10, False)
    norms = [(1 + 0.1 * rng.standard_normal(d)).astype(f32) if qk_norm else np.zeros(0, f32) for _ in range(2)]
    host = blocks(rng, kind, 10, nkv, bs, d)
    want = kv.KVBlocks(*(a.copy() for a in host))
    q = cuda_ref.rope_qk_store(np.zeros((T, nh, d), f32), qkv, want, cos, sin, tables, slots, positions, *norms,
                               1e-5)
    blocks_, dq = on_device(host), dev(np.zeros((T, nh, d), f32))
    cuda_attention.rope_qk_store(dq, dev(qkv), blocks_, dev(cos), dev(sin), dev(tables), dev(slots),
                                 dev(positions), *[dev(n) if n.size else n for n in norms], 1e-5)
    close(dq.copy_to_host(), q)
    got = to_host(blocks_, host)
    # values are copied, converted the same way: exactly (fp16 to nearest even; int8: the same scale and codes)
    assert np.array_equal(got.v, want.v) and np.array_equal(got.v_scale, want.v_scale)
    # keys come out of RoPE (and the norm) a few ulps apart, so may convert to the neighbouring stored value
    if kind == "fp32":
        close(got.k, want.k)
    elif kind == "fp16":
        a, b = got.k.view(np.float16).astype(f32), want.k.view(np.float16).astype(f32)
        assert np.abs(a - b).max() <= 2.0 ** -10 * np.abs(b).max()
    else:
        assert np.abs(got.k.astype(np.int32) - want.k).max() <= 1
        np.testing.assert_allclose(got.k_scale, want.k_scale, rtol=1e-5)
    written = np.zeros(host.k.shape[:3], bool)
    written[tables[slots, positions // bs], :, positions % bs] = True
    assert np.array_equal(got.k[~written], host.k[~written])   # nothing else moved


@settings(max_examples=3, deadline=None)
@given(T=st.integers(1, 3), group=st.sampled_from([1, 2]), d=st.sampled_from([16, 40]), bs=st.sampled_from([3, 4, 8]),
       split=st.sampled_from([4, 256]), kind=st.sampled_from(["fp32", "fp16", "int8"]), shared=st.booleans(),
       seed=st.integers(0, 99))
@example(T=3, group=2, d=40, bs=4, split=4, kind="int8", shared=True, seed=0).via("int8, several splits")
@example(T=2, group=1, d=16, bs=3, split=4, kind="fp16", shared=False, seed=1).via("fp16, several splits")
def test_attention_rows(T, group, d, bs, split, kind, shared, seed):
    """GQA rows over the paged cache (fp32, fp16, int8) of three sequences whose block tables may share their first
    block, each row at a random position of its own sequence (ragged lengths), head dims past a warp; one split,
    or several (a split is whole blocks, at least `split` positions) and their merge."""
    from tinyhun.kernels import cuda_attention
    rng = np.random.default_rng(seed)
    nkv, n, per = 2, 3, 4
    nh = nkv * group
    q = rng.standard_normal((T, nh, d)).astype(f32)
    host = blocks(rng, kind, n * per, nkv, bs, d)
    tables = tables_of(rng, n, per, n * per, shared)
    slots, positions = rng.integers(0, n, T), rng.integers(0, per * bs, T)
    want = kv.attention_rows(np.zeros((T, nh, d), f32), q, host, tables, slots, positions)
    out = dev(np.zeros((T, nh, d), f32))
    cuda_attention.attention_rows(out, dev(q), on_device(host), dev(tables), dev(slots), dev(positions), split=split)
    close(out.copy_to_host(), want)


def test_copy_block_and_zeros_on_the_device():
    """The CUDA backend's pool allocator (fp16 bits as float16 on the device, int8 with fp32 scales, nothing on the
    device for an empty array) and its copy-on-write copy equal the NumPy backend's."""
    from tinyhun.backend import NumpyBackend
    from tinyhun.cuda_backend import CudaBackend
    backend, rng = CudaBackend(), np.random.default_rng(6)
    for kind in ("fp16", "int8"):
        layers = kv.allocate(backend.zeros, 2, 5, 2, 8, kind)
        assert not layers[0].k.copy_to_host().any() and layers[1].k.shape == (5, 2, kv.BLOCK, 8)
        assert layers[0].k.dtype == {"fp16": np.float16, "int8": np.int8}[kind]
        assert (layers[0].k_scale.size > 0) == (kind == "int8")
        host = [blocks(rng, kind, 5, 2, kv.BLOCK, 8) for _ in range(2)]
        for h, d in zip(host, layers):
            for a, b in zip(h, d):
                if a.size:
                    b.copy_to_device(a.view(b.dtype))
        backend.copy_block(layers, 3, 1)
        NumpyBackend().copy_block(host, 3, 1)
        for h, d in zip(host, layers):
            for a, b in zip(h, to_host(d, h)):
                assert np.array_equal(a, b)


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
