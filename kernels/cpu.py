"""Numba CPU kernels: the same names, signatures and results as `tinyhun.kernels.ref`.

Every public op writes into `out` (preallocated by the caller) and returns it. Arrays are fp32; rmsnorm,
add_rmsnorm, silu_mul and add need them C-contiguous (others accept any strides, slower). The public
names are thin Python wrappers around `@njit` kernels that return nothing: boxing an array returned from
Numba costs ~0.45 µs a call, a Python wrapper ~0.1 µs.

Parallel kernels split their rows into chunks of about CHUNK elements or more (a prange iteration per small row
costs more in scheduling than the row's work; Numba's scheduler hands each thread a run of chunks) and run
serially when there is a single chunk, where the ~2 µs parallel launch would dominate. The chunk count does not
read the thread count: `get_num_threads()` inside a kernel defeats `cache=True` and costs 0.8 µs from Python.

GOMP_SPINCOUNT: after a parallel region Numba's OpenMP threads busy-wait, by default long enough to starve
OpenBLAS's threads when a prefill matmul follows (2 cores: Numba GEMV + BLAS T=128 took 8.0-36 ms in
sequence against 2.7-3.0 ms apart). A spin of 3000 keeps the launch at ~2 µs for back-to-back kernels and the
sequence at the sum of its parts; OMP_WAIT_POLICY=passive would cost ~50 µs a launch. It must be set before
the OpenMP runtime loads (Numba's first parallel call) and yields to a value the user set.
"""
import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from .cpu_attention import attention_kernel  # noqa: E402
from .cpu_math import JIT, exp_inplace  # noqa: E402
from .q4_cpu import matmul_q4  # noqa: E402
from .q8 import Q8Weight  # noqa: E402
from .q8_cpu import matmul_q8  # noqa: E402

CHUNK = 1 << 14  # elements per parallel chunk (~64 KB of fp32): below 2 chunks a kernel runs serially


@njit(**JIT)
def _n_chunks(units, size):
    return max(1, min(units, size // CHUNK))


@njit(**JIT)
def _bounds(c, nc, n, unit):
    # chunk c of nc over 0..n-1 in whole units; the last chunk takes the remainder
    units = n // unit
    return c * units // nc * unit, (n if c == nc - 1 else (c + 1) * units // nc * unit)


# ---- matmul: out[T, N] = x[T, K] @ w[N, K].T -----------------------------------------------------------------

# Below BLAS_T tokens the Numba kernel wins; from there OpenBLAS's cache-blocked sgemm does. Figures on this
# machine (2-core Xeon, AVX-512, 2 threads), µs, Numba vs np.matmul, weight [N, K]:
#   [2048,1024]: T=1 150 vs 151, T=4 210 vs 836, T=16 622 vs 1083, T=32 1011 vs 1454, T=40 1527 vs 1476,
#                T=64 2364 vs 1911, T=128 4847 vs 3475;  [1024,3584]: T=32 1844 vs 2400, T=48 3724 vs 3013.
# Single-threaded the crossover is the same, T = 32..40. At T = 1 both stream the weight at the read bandwidth
# (cold [2048,1024]: 280-346 vs 325-343 µs, ~26 GB/s); Numba keeps decode on one thread pool, where OpenBLAS's
# would contend with Numba's for the 2 cores.
BLAS_T = 40


@njit(**JIT)
def _tile44(out, x, w, t, n):
    # out[t:t+4, n:n+4] = x[t:t+4] @ w[n:n+4].T: 16 accumulators, 8 loads per 16 multiply-adds
    x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
    w0, w1, w2, w3 = w[n], w[n + 1], w[n + 2], w[n + 3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
    for k in range(w0.shape[0]):
        p0, p1, p2, p3 = w0[k], w1[k], w2[k], w3[k]
        v = x0[k]
        a00, a01, a02, a03 = a00 + v * p0, a01 + v * p1, a02 + v * p2, a03 + v * p3
        v = x1[k]
        a10, a11, a12, a13 = a10 + v * p0, a11 + v * p1, a12 + v * p2, a13 + v * p3
        v = x2[k]
        a20, a21, a22, a23 = a20 + v * p0, a21 + v * p1, a22 + v * p2, a23 + v * p3
        v = x3[k]
        a30, a31, a32, a33 = a30 + v * p0, a31 + v * p1, a32 + v * p2, a33 + v * p3
    o = out[t]
    o[n], o[n + 1], o[n + 2], o[n + 3] = a00, a01, a02, a03
    o = out[t + 1]
    o[n], o[n + 1], o[n + 2], o[n + 3] = a10, a11, a12, a13
    o = out[t + 2]
    o[n], o[n + 1], o[n + 2], o[n + 3] = a20, a21, a22, a23
    o = out[t + 3]
    o[n], o[n + 1], o[n + 2], o[n + 3] = a30, a31, a32, a33


@njit(**JIT)
def _gemv_rows(out, x, w, lo, hi):
    # out[n] = w[n] . x for n in lo..hi-1, four rows per pass over x[K]
    n = lo
    while n + 4 <= hi:
        w0, w1, w2, w3 = w[n], w[n + 1], w[n + 2], w[n + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(x.shape[0]):
            v = x[k]
            a0, a1, a2, a3 = a0 + w0[k] * v, a1 + w1[k] * v, a2 + w2[k] * v, a3 + w3[k] * v
        out[n], out[n + 1], out[n + 2], out[n + 3] = a0, a1, a2, a3
        n += 4
    for m in range(n, hi):
        wm = w[m]
        acc = np.float32(0.0)
        for k in range(x.shape[0]):
            acc += wm[k] * x[k]
        out[m] = acc


@njit(**JIT)
def _matmul_rows(out, x, w, lo, hi):
    # columns lo..hi-1 of out[T, N]: 4x4 tiles while 4 tokens and 4 rows remain, then row-at-a-time tails;
    # the tile's 4 weight rows stay in cache while every token passes over them
    T = x.shape[0]
    T4 = T - T % 4
    hi4 = lo + (hi - lo) // 4 * 4
    for n in range(lo, hi4, 4):
        for t in range(0, T4, 4):
            _tile44(out, x, w, t, n)
    for t in range(T4):
        _gemv_rows(out[t], x[t], w, hi4, hi)
    for t in range(T4, T):
        _gemv_rows(out[t], x[t], w, lo, hi)


@njit(parallel=True, **JIT)
def _matmul(out, x, w):
    # out[T, N] = x[T, K] @ w[N, K].T, threads split N in multiples of 4 rows
    N = w.shape[0]
    nc = _n_chunks(N // 4, x.shape[0] * w.size)
    if nc == 1:
        _matmul_rows(out, x, w, 0, N)
        return
    for c in prange(nc):
        lo, hi = _bounds(c, nc, N, 4)
        _matmul_rows(out, x, w, lo, hi)


def matmul(out, x, w):
    # out[T, N] = x[T, K] @ w[N, K].T; w may also be a Q4Weight or a Q8Weight, as in ref.matmul
    if isinstance(w, Q8Weight):
        return matmul_q8(out, x, w)
    if not isinstance(w, np.ndarray):
        return matmul_q4(out, x, w)
    if x.shape[0] < BLAS_T:
        _matmul(out, x, w)
    else:
        np.matmul(x, w.T, out=out)
    return out


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
        _rmsnorm_rows(o2, x2, w, e, 0, rows)
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
        _add_rmsnorm_rows(out, resid, x, w, e, 0, rows)
        return
    for c in prange(nc):
        _add_rmsnorm_rows(out, resid, x, w, e, c * rows // nc, (c + 1) * rows // nc)


def add_rmsnorm(out_norm, resid, x, w, eps):
    # resid[T, n] += x[T, n] in place, then out_norm = rmsnorm(resid, w, eps); see ref_fused.add_rmsnorm
    _add_rmsnorm(out_norm, resid, x, w, float(eps))
    return out_norm


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
        _rope_rows(x, cos, sin, 0, rows)
        return
    for c in prange(nc):
        _rope_rows(x, cos, sin, c * rows // nc, (c + 1) * rows // nc)


def rope(x, cos, sin):
    # in place: x[T, n_heads, d] rotated NeoX style (i pairs with i + d/2); cos/sin[T, d/2]
    _rope(x, cos, sin)
    return x


# ---- attention ----------------------------------------------------------------------------------------------

def attention(out, q, k_cache, v_cache, pos):
    # out[T, nh, d] = causal GQA softmax(q k^T / sqrt(d)) v; k_cache/v_cache[nkv, S, d] hold 0..pos+T-1
    attention_kernel(out, q, k_cache, v_cache, int(pos))
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
        _silu_mul_span(o, g, u, 0, n)
        return
    for c in prange(nc):
        lo, hi = _bounds(c, nc, n, SPAN)
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


# ---- compilation up front ------------------------------------------------------------------------------------

def warmup():
    """Compile (or load from Numba's cache) every kernel for the fp32 C-contiguous signatures the model uses."""
    f = np.float32
    x, w, o = np.ones((4, 8), f), np.ones((8, 8), f), np.empty((4, 8), f)
    matmul(o, x, w)
    rmsnorm(o, x, w[0], 1e-6)
    rmsnorm(np.empty((4, 2, 4), f), np.ones((4, 2, 4), f), w[0, :4], 1e-6)   # per-head q/k norm
    add_rmsnorm(o, x.copy(), x, w[0], 1e-6)
    silu_mul(o, x, x)
    _add(o, x, x)                      # add() takes NumPy's ufunc below 2 * CHUNK elements
    q, kv = np.ones((2, 4, 8), f), np.ones((2, 4, 8), f)
    rope(q, np.ones((2, 4), f), np.zeros((2, 4), f))
    attention(np.empty_like(q), q, kv, kv, 2)


def __getattr__(name):
    # decoder_layer and prepare_layer live in cpu_layer, which builds on this module: resolved on first use so that
    # either module can be imported first
    if name in ("decoder_layer", "prepare_layer"):
        from . import cpu_layer
        globals()[name] = getattr(cpu_layer, name)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
