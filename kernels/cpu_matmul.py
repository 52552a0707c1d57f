"""Numba fp32 matmul, out[T, N] = x[T, K] @ w[N, K].T: register-tiled for decode and short prefills."""
import numpy as np
from numba import njit, prange

from .cpu_math import JIT, ZERO, _bounds, _n_chunks

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
        _matmul_rows(out, x, w, ZERO, N)
        return
    for c in prange(nc):
        lo, hi = _bounds(np.int64(c), nc, N, 4)
        _matmul_rows(out, x, w, lo, hi)




def matmul(out, x, w):
    # out[T, N] = x[T, K] @ w[N, K].T (fp32)
    if x.shape[0] < BLAS_T:
        _matmul(out, x, w)
    else:
        np.matmul(x, w.T, out=out)
    return out
