"""numba.cuda linears: `linear` (a GEMV for a few rows, a tiled GEMM for a prefill: cuda_gemm.py), `embed_rows`, and
`argmax_rows` (greedy decoding's pick, so only a token id leaves the device), with the signatures of their
references in tinyhun.kernels.cuda_ref, on the device formats H16 and R4 described there.

The GEMV gives each warp RPW output rows (pairs of rows, gate and up, in pairs mode), WARPS warps per block: the lanes
read consecutive 32-bit words of the row (coalesced), the activations sit in shared memory (RMSNorm applied as they
are loaded, so a norm costs no launch), and the epilogue adds the residual or writes silu(gate) * up. For INT4 the
shared activations are stored permuted, xs[j * K/8 + c] = x[8c + j], so the lanes' reads of one word's eight
activations hit distinct banks. Kernels are compiled per (format, K, options) on first use.

An Adapted linear (a LoRA side path, cuda_ref.Side) costs one more launch, t = x_in @ A.T for all its adapted parts
(a plain fp16 GEMV or GEMM into the caller's `side` scratch); the base's kernel then adds scale[n] * B[n] . t[row,
first[n]:] to output n's sum before its epilogue: in the GEMV the lanes split the r terms as they split K's.
"""
import math
from functools import lru_cache

import numpy as np
from numba import cuda, float32, int64

from .cuda_common import SHUFFLE, WARP, block_sum, launch, warp_sums
from .cuda_gemm import BN, DENSE, DOWN, PAIRS, PLAIN, RESID, UP, _gemm, _weight_element, expert_of, side_term
from .cuda_ref import BM, H16, Adapted, shape

WARPS = 4          # GEMV warps per block
# GEMV output rows per warp: one on a GPU (many blocks in flight), four for a wide matrix (the lm_head: each block
# loads and norms x once for more rows); eight under the simulator, whose cost is its barriers per block (the same
# code either way; the kernel tests run several)
RPW = 1 if SHUFFLE else 8
WIDE = 8192
GEMV_ROWS = 4      # up to this many rows run as GEMVs (one pass over the weight per row); more as a GEMM (cuda_gemm)


def rows_per_warp(units):
    return RPW * 4 if SHUFFLE and units >= WIDE else RPW


@lru_cache(maxsize=None)
def _row_dot(fmt, K, sym, group):
    """A device function: this lane's part of dot(w[n], x) over the shared activations xs."""
    C = K // 8
    if fmt == "h16":
        @cuda.jit(device=True)
        def dot(a, b, c, n, xs, lane):
            acc = float32(0.0)
            for k in range(lane, K, WARP):
                acc += float32(a[n, k]) * xs[k]
            return acc
        return dot

    @cuda.jit(device=True)
    def dot(a, b, c, n, xs, lane):
        acc = float32(0.0)
        for col in range(lane, C, WARP):
            word = a[n, col]
            g = (col * 8) // group
            wsum = float32(0.0)
            xsum = float32(0.0)
            for j in range(4):
                x0 = xs[j * C + col]
                x1 = xs[(4 + j) * C + col]
                wsum += float32((word >> (8 * j)) & 15) * x0 + float32((word >> (8 * j + 4)) & 15) * x1
                xsum += x0 + x1
            if sym:
                acc += float32(b[n, g]) * (wsum - float32(8.0) * xsum)
            else:
                acc += float32(b[n, g]) * wsum + float32(c[n, g]) * xsum
        return acc
    return dot


@lru_cache(maxsize=None)
def _gemv(fmt, K, has_norm, mode, sym, group, rpw, moe=DENSE, side=False):
    NT = WARPS * WARP
    C = K // 8
    permute = fmt == "r4"
    per = 2 if mode == PAIRS else 1   # dot products per unit
    nacc = rpw * per                  # array shapes must be plain constants for the CUDA compiler
    dot = _row_dot(fmt, K, sym, group)

    @cuda.jit
    def gemv(out, x, nw, eps, a, b, c, resid, units, ids, rw, k, kk, n_experts, lb, lf, ls, lt):
        # out[row, unit], rpw units per warp; units: output rows (plain/resid) or gate/up pairs (per expert when
        # moe); lb, lf, ls, lt: a side path's B, first, scale and t (side; dense rows only). blockIdx.y: DENSE a
        # row t of x; UP an assignment t kk + j (x row t, its j-th expert's rows, out row t kk + j); DOWN a row t
        # summing its kk experts, each reading x row t kk + j, weighted
        tid = cuda.threadIdx.x
        by = cuda.blockIdx.y
        xs = cuda.shared.array(K, float32)
        red = cuda.shared.array(NT, float32)
        reds = cuda.shared.array((nacc, NT), float32)
        lane = tid % WARP
        first = (cuda.blockIdx.x * WARPS + tid // WARP) * rpw
        acc = cuda.local.array(nacc, float32)
        for i in range(nacc):
            acc[i] = float32(0.0)
        t = by // kk if moe == UP else by
        for jj in range(kk if moe == DOWN else 1):
            j = by % kk if moe == UP else jj
            e, wt = 0, float32(1.0)
            if moe == UP:
                e = ids[t * k + j] if j < k else n_experts   # no weight: it applies after the nonlinearity
            elif moe == DOWN:
                e, wt = expert_of(ids, rw, t, j, k, n_experts)
            src = t * kk + j if moe == DOWN else t
            if jj > 0:
                cuda.syncthreads()   # every warp is done with the previous expert's activations
            r = float32(1.0)
            if has_norm:
                ss = float32(0.0)
                for q in range(tid, K, NT):
                    ss += x[src, q] * x[src, q]
                r = float32(1.0) / math.sqrt(block_sum(ss, red, tid, NT) / float32(K) + float32(eps))
            for q in range(tid, K, NT):
                v = x[src, q] * r * nw[q] if has_norm else x[src, q]
                xs[(q % 8) * C + q // 8 if permute else q] = v
            cuda.syncthreads()
            base = e * units
            for i in range(rpw):
                u = min(first + i, units - 1)   # every warp takes part in the sums (they synchronize)
                for p in range(per):
                    acc[i * per + p] += wt * dot(a, b, c, (base + u) * per + p, xs, lane)
                    if side:
                        acc[i * per + p] += side_term(lb, lf, ls, lt, u * per + p, t, lane, WARP)
        warp_sums(acc, nacc, reds, tid)
        if lane == 0:
            for i in range(rpw):
                u = first + i
                if u < units:
                    if mode == PAIRS:
                        g = acc[2 * i]
                        out[by, u] = g / (float32(1.0) + math.exp(-g)) * acc[2 * i + 1]
                    elif mode == RESID:
                        out[t, u] = acc[i] + resid[t, u]
                    else:
                        out[by, u] = acc[i]
    return gemv


def _fields(w):
    """(format name, (a, b, c) arrays, sym, group) of a device linear."""
    if isinstance(w, H16):
        return "h16", (w.w, w.w, w.w), True, 0
    return "r4", (w.words, w.scales, w.mins), w.sym, w.group


@lru_cache(maxsize=None)
def no_routing():
    # routing arguments that are never read (a dense linear's): a device int64[1, 3] and float32[1]
    return cuda.to_device(np.zeros((1, 3), np.int64)), cuda.to_device(np.zeros(1, np.float32))


@lru_cache(maxsize=None)
def no_side():
    # side-path arguments that are never read (a linear without one): B, first, scale, t
    return (cuda.to_device(np.zeros((1, 1), np.float16)), cuda.to_device(np.zeros(1, np.int32)),
            cuda.to_device(np.zeros(1, np.float32)), cuda.to_device(np.zeros((1, 1), np.float32)))


def linear(out, x, w, norm=None, eps=0.0, resid=None, pairs=False, rpw=None, side=None):
    # see kernels.cuda_ref.linear; device arrays: x float32[T, K], out float32[T, N] (or [T, N/2] in pairs mode);
    # rpw: GEMV rows per warp (default rows_per_warp); side: flat float32 scratch of at least T x (the side path's
    # A rows) for an Adapted w's t
    idx, rw = no_routing()
    routing = (idx, idx[0], idx[0], rw, 1, 1, 0)
    T = x.shape[0]
    lora = None
    if isinstance(w, Adapted):
        s = w.side
        R = shape(s.a)[0]
        t = side[:T * R].reshape(T, R)
        dispatch(t, x, s.a, norm, eps, None, False, None, DENSE, T, R, routing)
        w, lora = w.base, (s.b, s.first, s.scale, t)
    dispatch(out, x, w, norm, eps, resid, pairs, rpw, DENSE, T, shape(w)[0], routing, lora)
    return out


def dispatch(out, x, w, norm, eps, resid, pairs, rpw, moe, T, N, routing, lora=None):
    """One GEMV (T <= GEMV_ROWS rows of x) or GEMM launch of w (N rows, per expert when moe) on x: the dense
    linear and the experts' (kernels.cuda_moe). routing = (tiles, order, ids, weights, k, kk, n_experts), the
    grouping arrays read by a GEMM of experts, the routing read by a GEMV of them; lora: (B, first, scale, t) of
    a side path whose t is computed (dense rows only)."""
    K = x.shape[1]
    fmt, (a, b, c), sym, group = _fields(w)
    side = lora is not None
    lora = lora or no_side()
    mode = PAIRS if pairs else (PLAIN if resid is None else RESID)
    nw = x[0] if norm is None else norm    # never read without a norm
    rs = out if resid is None else resid   # never read without a residual
    tiles, order, ids, rw, k, kk, ne = routing
    if T <= GEMV_ROWS:
        units = N // 2 if pairs else N
        rpw = rpw or rows_per_warp(units)
        kern = _gemv(fmt, K, norm is not None, mode, sym, group, rpw, moe, side)
        grid_y = T * kk if moe == UP else T
        launch(kern, (-(-units // (WARPS * rpw)), grid_y), WARPS * WARP, out, x, nw, eps, a, b, c, rs, units, ids,
               rw, k, kk, ne, *lora)
    else:
        kern = _gemm(fmt, K, norm is not None, mode, sym, group, moe, side)
        grid_y = -(-T // BM) if moe == DENSE else tiles.shape[0]
        launch(kern, (-(-N // BN), grid_y), (16, 16), out, x, nw, eps, a, b, c, rs, N, tiles, order, ids, rw, k,
               kk, ne, *lora)


@lru_cache(maxsize=None)
def _embed(fmt, sym, group):
    element = _weight_element(fmt, sym, group)

    @cuda.jit
    def embed(out, a, b, c, ids):
        t = cuda.blockIdx.x
        for k in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
            out[t, k] = element(a, b, c, ids[t], k)
    return embed


def embed_rows(out, w, ids):
    # out[T, K] = dense(w)[ids]; ids int64[T] on the device
    fmt, (a, b, c), sym, group = _fields(w)
    launch(_embed(fmt, sym, group), out.shape[0], 128, out, a, b, c, ids)
    return out


ARGMAX_THREADS = 256


@cuda.jit
def _argmax(out, x):
    # one block per row: each thread scans a strided slice (strict > keeps its lowest index), then a tree of
    # (value, index) pairs, ties to the lower index; V (past the end) marks a thread that saw nothing
    t, i, V = cuda.blockIdx.x, cuda.threadIdx.x, x.shape[1]
    vals = cuda.shared.array(ARGMAX_THREADS, float32)
    idx = cuda.shared.array(ARGMAX_THREADS, int64)
    best, at = float32(-np.inf), V
    for v in range(i, V, ARGMAX_THREADS):
        if at == V or x[t, v] > best:
            best, at = x[t, v], v
    vals[i], idx[i] = best, at
    cuda.syncthreads()
    s = ARGMAX_THREADS // 2
    while s > 0:
        if i < s:
            b, j = vals[i + s], idx[i + s]
            if b > vals[i] or (b == vals[i] and j < idx[i]):
                vals[i], idx[i] = b, j
        cuda.syncthreads()
        s //= 2
    if i == 0:
        out[t] = idx[0]


def argmax_rows(out, x):
    # see kernels.cuda_ref.argmax_rows; device arrays out int64[T], x float32[T, V]
    launch(_argmax, x.shape[0], ARGMAX_THREADS, out, x)
    return out
