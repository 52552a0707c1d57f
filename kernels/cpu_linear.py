"""`linear` inside Numba code: the kernel for each weight format of tinyhun.kernels.linear, chosen at compile time by
the NamedTuple's class. A new format adds one entry to KERNELS."""
import numpy as np
from numba import njit, prange, types
from numba.core.errors import TypingError
from numba.extending import overload

from . import cpu_matmul, q4_cpu, q8_cpu
from .cpu_math import JIT, ZERO, _n_chunks
from .cpu_matmul import BLAS_T, _matmul
from .cpu_simd import _fma, _lane, _load_f, _load_h, _reduce_f, _splat_f, _store_f
from .linear import F32, LoRA, Q4, Q8, linear, rank_scratch
from .q4 import ACT_BLOCK, TILE


def _f32(out, x, w, acts):
    if x.shape[0] < BLAS_T:
        _matmul(out, x, w.w)
    else:
        np.dot(x, w.w.T, out)


def _q4(out, x, w, acts):
    if x.shape[0] == 1:
        q4_cpu._gemv(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales, w.mins, w.sym)
    elif x.shape[0] <= q4_cpu.FEW_T:
        q4_cpu._gemm_few(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales, w.mins, w.sym)
    else:
        q4_cpu._gemm(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales, w.mins, w.sym)


def _q8(out, x, w, acts):
    if x.shape[0] == 1:
        q8_cpu._gemv(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales)
    elif x.shape[0] <= q4_cpu.FEW_T:
        q8_cpu._gemm_few(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales)
    else:
        q8_cpu._gemm(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales)


def _vec(a, off):
    """f32x16 of a's flat elements off..off+15: a float32, or fp16 bits (uint16) widened in registers."""


@overload(_vec, inline="always")
def _vec_ov(a, off):
    if a.dtype == types.uint16:
        return lambda a, off: _load_h(a, off)
    return lambda a, off: _load_f(a, off)


@njit(cache=True, inline="always")
def _rank_row(t, i, x, a, scale):
    # t[i] = scale * a @ x[i] for a[r, K], K a multiple of 16: four rows of a per pass over x[i], four chains
    r, k = a.shape
    x0, r4 = i * k, r - r % 4
    for j in range(0, r4, 4):
        a0 = a1 = a2 = a3 = _splat_f(0.0)
        for c in range(0, k, 16):
            v = _load_f(x, x0 + c)
            a0 = _fma(a0, _vec(a, j * k + c), v)
            a1 = _fma(a1, _vec(a, (j + 1) * k + c), v)
            a2 = _fma(a2, _vec(a, (j + 2) * k + c), v)
            a3 = _fma(a3, _vec(a, (j + 3) * k + c), v)
        t[i, j], t[i, j + 1] = scale * _reduce_f(a0, False), scale * _reduce_f(a1, False)
        t[i, j + 2], t[i, j + 3] = scale * _reduce_f(a2, False), scale * _reduce_f(a3, False)
    for j in range(r4, r):
        a0 = _splat_f(0.0)
        for c in range(0, k, 16):
            a0 = _fma(a0, _vec(a, j * k + c), _load_f(x, x0 + c))
        t[i, j] = scale * _reduce_f(a0, False)


@njit(cache=True)
def _rank_in(t, x, a, scale):
    # t[T, r] = scale * x[T, K] @ a[r, K].T
    for i in range(x.shape[0]):
        _rank_row(t, i, x, a, np.float32(scale))


@njit(cache=True, inline="always")
def _rank_tile(acc, t, i, b, tile):
    # acc + t[i] @ b[tile] (b[tile]: r x 16 lanes), in four chains so the adds overlap
    r = b.shape[1]
    o, r4 = tile * r * TILE, r - r % 4
    a1 = a2 = a3 = _splat_f(0.0)
    for j in range(0, r4, 4):
        acc = _fma(acc, _vec(b, o + j * TILE), _splat_f(t[i, j]))
        a1 = _fma(a1, _vec(b, o + (j + 1) * TILE), _splat_f(t[i, j + 1]))
        a2 = _fma(a2, _vec(b, o + (j + 2) * TILE), _splat_f(t[i, j + 2]))
        a3 = _fma(a3, _vec(b, o + (j + 3) * TILE), _splat_f(t[i, j + 3]))
    for j in range(r4, r):
        acc = _fma(acc, _vec(b, o + j * TILE), _splat_f(t[i, j]))
    one = _splat_f(1.0)
    return _fma(_fma(_fma(acc, a1, one), a2, one), a3, one)


@njit(cache=True)
def _rank_out_tiles(out, t, b, lo, hi):
    n = out.shape[1]
    for tile in range(lo, hi):
        r0 = tile * TILE
        for i in range(out.shape[0]):
            if r0 + TILE <= n:
                _store_f(out, i * n + r0, _rank_tile(_load_f(out, i * n + r0), t, i, b, tile))
            else:
                acc = _rank_tile(_splat_f(0.0), t, i, b, tile)
                for m in range(n - r0):
                    out[i, r0 + m] += _lane(acc, m)


@njit(cache=True, parallel=True)
def _rank_out(out, t, b):
    # out[T, N] += t[T, r] @ B.T, B's tiles b[N/16, r, 16]; threads split the tiles
    tiles = b.shape[0]
    nc = _n_chunks(tiles, out.shape[0] * b.size)
    if nc == 1:
        _rank_out_tiles(out, t, b, ZERO, tiles)
        return
    for c in prange(nc):
        _rank_out_tiles(out, t, b, c * tiles // nc, (c + 1) * tiles // nc)


@njit(cache=True, parallel=True)
def _q4_side_gemv(out, x, xq, xd, xqsum, xsum, packed, scales, mins, sym, t, b):
    # q4_cpu._gemv with each tile's side-path update added to its accumulator before the one store
    q4_cpu._quantize_acts(x, xq, xd, xqsum, xsum)
    n, k = out.shape[1], x.shape[1]
    nb, ng = k // ACT_BLOCK, scales.shape[1]
    per = nb // ng
    for tile in prange(packed.shape[0]):
        acc = q4_cpu._gemv_tile(tile, nb, ng, per, xq, xd, xqsum, xsum, packed, scales, mins, sym)
        q4_cpu._store_tile(out, 0, n, tile, _rank_tile(acc, t, 0, b, tile))


@njit(cache=True, parallel=True)
def _q8_side_gemv(out, x, xq, xd, xqsum, xsum, packed, scales, t, b):
    # q8_cpu._gemv, likewise
    q4_cpu._quantize_acts(x, xq, xd, xqsum, xsum)
    n, nb = out.shape[1], scales.shape[1]
    for tile in prange(packed.shape[0]):
        acc = q8_cpu._gemv_tile(tile, nb, xq, xd, xqsum, packed, scales)
        q4_cpu._store_tile(out, 0, n, tile, _rank_tile(acc, t, 0, b, tile))


def _side_gemv(out, x, base, acts, t, b):
    """out[1, N] = base(x) + t @ B.T: fused into the base's tile loop where it has one."""


@overload(_side_gemv, jit_options=JIT)
def _side_gemv_ov(out, x, base, acts, t, b):
    kind = getattr(base, "instance_class", None)
    if kind is Q4:
        def q4_side(out, x, base, acts, t, b):
            _q4_side_gemv(out, x, acts.q, acts.d, acts.qsum, acts.xsum, base.packed, base.scales, base.mins,
                          base.sym, t, b)
        return q4_side
    if kind is Q8:
        def q8_side(out, x, base, acts, t, b):
            _q8_side_gemv(out, x, acts.q, acts.d, acts.qsum, acts.xsum, base.packed, base.scales, t, b)
        return q8_side

    def after(out, x, base, acts, t, b):
        linear(out, x, base, acts)
        _rank_out(out, t, b)
    return after


def _lora(out, x, w, acts):
    # the rank-r intermediate first (in the rank half of the scratch), then the base with the update added
    T, r = x.shape[0], w.a.shape[0]
    half = acts.q.size // 2
    t = acts.q[half:half + T * r * 4].view(np.float32).reshape((T, r))
    _rank_in(t, x, w.a, w.scale)
    if T == 1:
        _side_gemv(out, x, w.base, acts, t, w.b)
    else:
        linear(out, x, w.base, acts)
        _rank_out(out, t, w.b)


KERNELS = {F32: _f32, Q4: _q4, Q8: _q8, LoRA: _lora}


@overload(linear, jit_options=JIT)
def _linear_ov(out, x, w, acts):
    kernel = KERNELS.get(getattr(w, "instance_class", None))
    if kernel is None:
        raise TypingError(f"linear: no Numba kernel for weights of type {w}")
    return kernel


def _f32_py(out, x, w, acts):
    cpu_matmul.matmul(out, x, w.w)


def _q4_py(out, x, w, acts):
    q4_cpu._launch(q4_cpu.KERNELS, out, x, acts.view(*x.shape), w.packed, w.scales, w.mins, w.sym)


def _q8_py(out, x, w, acts):
    q8_cpu._launch(q8_cpu.KERNELS, out, x, acts.view(*x.shape), w.packed, w.scales)


def _lora_py(out, x, w, acts):
    x = np.ascontiguousarray(x)
    t = rank_scratch(acts, x.shape[0], w.a.shape[0])
    _rank_in(t, x, w.a, w.scale)
    if x.shape[0] == 1 and isinstance(w.base, Q4):
        _q4_side_gemv(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.base.packed, w.base.scales, w.base.mins,
                      w.base.sym, t, w.b)
    elif x.shape[0] == 1 and isinstance(w.base, Q8):
        _q8_side_gemv(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.base.packed, w.base.scales, t, w.b)
    else:
        matmul(out, x, w.base, acts)
        _rank_out(out, t, w.b)


PYTHON = {F32: _f32_py, Q4: _q4_py, Q8: _q8_py, LoRA: _lora_py}


def matmul(out, x, w, acts):
    """`linear` called from Python on the Numba kernels (each kernel compiled only once a call needs it: a decode
    step never compiles the prefill GEMM)."""
    PYTHON[type(w)](out, x, w, acts)
    return out
