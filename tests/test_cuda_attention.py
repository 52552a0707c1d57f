"""The numba.cuda attention kernels over the paged KV cache (kernels/kv.py's layout) against their NumPy references,
tiny shapes, and the CUDA backend's pool allocator and copy on write. Run as test_cuda_kernels.py is (its
simulator subprocess, or bench/gpu_check.py on a GPU)."""
import os

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_cuda_kernels import close, dev

from tinyhun.kernels import cuda_ref, kv

pytestmark = pytest.mark.skipif(os.environ.get("TINYHUN_CUDA_TESTS") != "1",
                                reason="run by test_cuda_sim.py (simulator subprocess) or bench/gpu_check.py")
f32 = np.float32


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
    from tinyhun.backends import NumpyBackend
    from tinyhun.backends.cuda import CudaBackend
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
