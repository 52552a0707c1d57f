"""Numba CPU kernels: the same names, signatures and results as `tinyhun.kernels.ref`.

Every public op writes into `out` (preallocated by the caller) and returns it. Arrays are fp32; rmsnorm,
add_rmsnorm, silu_mul and add need them C-contiguous (others accept any strides, slower). The public
names are thin Python wrappers around `@njit` kernels that return nothing: boxing an array returned from
Numba costs ~0.45 µs a call, a Python wrapper ~0.1 µs.

Parallel kernels split their rows into chunks of about CHUNK elements or more (a prange iteration per small row
costs more in scheduling than the row's work; Numba's scheduler hands each thread a run of chunks) and run
serially when there is a single chunk, where the ~2 µs parallel launch would dominate. The chunk count does not
read the thread count: `get_num_threads()` inside a kernel defeats `cache=True` and costs 0.8 µs from Python.
"""
import numpy as np
from numba import njit, prange

from . import cpu_linear, moe_cpu, ref  # noqa: F401  (they register the Numba `linear` and MoE ops)
from .cpu_attention import attention_kernel
from .cpu_kv import check_rows, store_kv_kernel
from .cpu_math import CHUNK, JIT, ZERO, _bounds, _n_chunks, compiles_to, exp_inplace
from .cpu_matmul import BLAS_T, matmul  # noqa: F401  (BLAS_T: tests; matmul: public)


# ---- rmsnorm / add_rmsnorm ----------------------------------------------------------------------------------

@njit(inline="always", **JIT)
def _norm_row(o, r, w, eps):
    # o[n] = r[n] / rms(r) * w[n]; sum of squares in fp32
    ss = np.float32(0.0)
    for i in range(r.shape[0]):
        ss += r[i] * r[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(r.shape[0]) + eps)
    for i in range(r.shape[0]):
        o[i] = r[i] * inv * w[i]


@njit(**JIT)
def _rmsnorm_rows(out, x, w, eps, lo, hi):
    for t in range(lo, hi):
        _norm_row(out[t], x[t], w, eps)


@njit(parallel=True, **JIT)
def _rmsnorm(out, x, w, eps):
    # x, out[..., n] C-contiguous, normalised over the last axis
    n = x.shape[-1]
    rows = x.size // n
    x2 = x.reshape((rows, n))
    o2 = out.reshape((rows, n))
    e = np.float32(eps)
    nc = _n_chunks(rows, x.size)
    if nc == 1:
        _rmsnorm_rows(o2, x2, w, e, ZERO, rows)
        return
    for c in prange(nc):
        _rmsnorm_rows(o2, x2, w, e, c * rows // nc, (c + 1) * rows // nc)


def rmsnorm(out, x, w, eps):
    # out[..., n] = x / rms(x) * w over the last axis, any number of leading axes
    _rmsnorm(out, x, w, float(eps))   # float(): an np.float32 eps would compile a second specialization
    return out


@njit(**JIT)
def _add_rmsnorm_rows(out, resid, x, w, eps, lo, hi):
    for t in range(lo, hi):
        r = resid[t]
        xt = x[t]
        for i in range(r.shape[0]):
            r[i] += xt[i]
        _norm_row(out[t], r, w, eps)


@njit(parallel=True, **JIT)
def _add_rmsnorm(out, resid, x, w, eps):
    # resid[T, n] += x[T, n]; out[T, n] = rmsnorm(resid); the row is still in cache for the norm's two passes
    rows = resid.shape[0]
    e = np.float32(eps)
    nc = _n_chunks(rows, resid.size)
    if nc == 1:
        _add_rmsnorm_rows(out, resid, x, w, e, ZERO, rows)
        return
    for c in prange(nc):
        _add_rmsnorm_rows(out, resid, x, w, e, c * rows // nc, (c + 1) * rows // nc)


def add_rmsnorm(out, resid, x, w, eps):
    # resid[T, n] += x[T, n] in place, then out = rmsnorm(resid, w, eps)
    _add_rmsnorm(out, resid, x, w, float(eps))
    return out


# ---- rope ---------------------------------------------------------------------------------------------------

@njit(**JIT)
def _rope_rows(x, cos, sin, lo, hi):
    # rows r = t * n_heads + h of x[T, n_heads, d]
    nh = x.shape[1]
    half = x.shape[2] // 2
    for r in range(lo, hi):
        t = r // nh
        v = x[t, r - t * nh]
        c = cos[t]
        s = sin[t]
        v1 = v[:half]
        v2 = v[half:]
        for i in range(half):
            a = v1[i]
            b = v2[i]
            v1[i] = a * c[i] - b * s[i]
            v2[i] = b * c[i] + a * s[i]


@njit(parallel=True, **JIT)
def _rope(x, cos, sin):
    rows = x.shape[0] * x.shape[1]
    nc = _n_chunks(rows, x.size)
    if nc == 1:
        _rope_rows(x, cos, sin, ZERO, rows)
        return
    for c in prange(nc):
        _rope_rows(x, cos, sin, c * rows // nc, (c + 1) * rows // nc)


def rope(x, cos, sin):
    # in place: x[T, n_heads, d] rotated NeoX style (i pairs with i + d/2); cos/sin[T, d/2]
    _rope(x, cos, sin)
    return x


# ---- the paged KV cache (kernels/kv.py) -----------------------------------------------------------------------

def store_kv(kv, k, v, tables, slots, positions):
    # kv: KVBlocks of one layer; row t's k, v[T, nkv, d] go to position positions[t] of sequence slots[t], in the
    # blocks' storage (bytes equal to kv.encode's)
    T = len(k)
    if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != (kv.k.shape[1], kv.k.shape[3]):
        raise ValueError(f"k, v: [T, {kv.k.shape[1]}, {kv.k.shape[3]}] expected, got {k.shape} and {v.shape}")
    tables, slots, positions = check_rows(kv, tables, slots, positions, T, attend=False)
    store_kv_kernel(kv, np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32), tables, slots,
                    positions)
    return kv


def attention_rows(out, q, kv, tables, slots, positions):
    # out[T, nh, d]: row t's queries q[t] attend causally to positions 0..positions[t] of sequence slots[t]
    if q.ndim != 3 or out.shape != q.shape or q.shape[2] != kv.k.shape[3] or q.shape[1] % kv.k.shape[1]:
        raise ValueError(f"q, out: [T, a multiple of {kv.k.shape[1]} heads, {kv.k.shape[3]}] expected, got "
                         f"{q.shape} and {out.shape}")
    tables, slots, positions = check_rows(kv, tables, slots, positions, len(q), attend=True)
    attention_kernel(out, q, kv, tables, slots, positions)
    return out


# ---- elementwise --------------------------------------------------------------------------------------------

SPAN = 512  # elements per exp pass: its scratch stays in L1


@njit(**JIT)
def _silu_mul_span(o, g, u, lo, hi):
    # o[i] = g[i] / (1 + exp(-g[i])) * u[i]; exps into a scratch, so `out` may alias `gate` or `up`
    e = np.empty(SPAN, np.float32)
    nb = np.empty(SPAN, np.int32)
    for s in range(lo, hi, SPAN):
        m = min(SPAN, hi - s)
        gs, us, os = g[s:s + m], u[s:s + m], o[s:s + m]   # slices: indexing g[s + i] costs a wraparound check
        for i in range(m):
            e[i] = -gs[i]
        exp_inplace(e, nb, m)
        for i in range(m):
            os[i] = gs[i] / (np.float32(1.0) + e[i]) * us[i]


@njit(parallel=True, **JIT)
def _silu_mul(out, gate, up):
    n = out.size
    o, g, u = out.reshape(n), gate.reshape(n), up.reshape(n)
    nc = _n_chunks(n // SPAN, 4 * n)  # an exp costs several multiply-adds: share from 8K elements
    if nc == 1:
        _silu_mul_span(o, g, u, ZERO, n)
        return
    for c in prange(nc):
        lo, hi = _bounds(np.int64(c), nc, n, SPAN)
        _silu_mul_span(o, g, u, lo, hi)


def silu_mul(out, gate, up):
    # out = silu(gate) * up, elementwise
    _silu_mul(out, gate, up)
    return out


@njit(**JIT)
def _add_span(o, a, b, lo, hi):
    os, as_, bs = o[lo:hi], a[lo:hi], b[lo:hi]
    for i in range(hi - lo):
        os[i] = as_[i] + bs[i]


@njit(parallel=True, **JIT)
def _add(out, a, b):
    n = out.size
    o, a1, b1 = out.reshape(n), a.reshape(n), b.reshape(n)
    nc = _n_chunks(n, n)
    for c in prange(nc):
        _add_span(o, a1, b1, c * n // nc, (c + 1) * n // nc)


def add(out, a, b):
    # NumPy's ufunc is dispatched faster than Numba (a [1,1024] add: 0.59 vs 1.14 µs), so Numba only shares
    # large adds between threads
    if out.size < 2 * CHUNK:
        np.add(a, b, out=out)
    else:
        _add(out, a, b)
    return out


# ---- the same ops inside Numba code: wherever compiled code calls ref.<op>, it compiles the kernel's body ----

for _op, _kernel in ((ref.rmsnorm, _rmsnorm), (ref.add_rmsnorm, _add_rmsnorm), (ref.rope, _rope),
                     (ref.store_kv, store_kv_kernel), (ref.attention_rows, attention_kernel),
                     (ref.silu_mul, _silu_mul), (ref.add, _add)):
    compiles_to(_op, _kernel)
