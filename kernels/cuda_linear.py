"""numba.cuda linears: `linear` (a GEMV for a few rows, a tiled GEMM for a prefill) and `embed_rows`, with the
signatures of their references in tinyhun.kernels.cuda_ref, on the device formats H16 and R4 described there.

The GEMV gives each warp RPW output rows (pairs of rows, gate and up, in pairs mode), WARPS warps per block: the lanes
read consecutive 32-bit words of the row (coalesced), the activations sit in shared memory (RMSNorm applied as they
are loaded, so a norm costs no launch), and the epilogue adds the residual or writes silu(gate) * up. For INT4 the
shared activations are stored permuted, xs[j * K/8 + c] = x[8c + j], so the lanes' reads of one word's eight
activations hit distinct banks. Kernels are compiled per (format, K, options) on first use.
"""
import math
from functools import lru_cache

from numba import cuda, float32

from .cuda_common import SHUFFLE, WARP, block_sum, launch, warp_sums
from .cuda_ref import H16, shape

WARPS = 4          # GEMV warps per block
# GEMV output rows per warp: one on a GPU (many blocks in flight), four for a wide matrix (the lm_head: each block
# loads and norms x once for more rows); eight under the simulator, whose cost is its barriers per block (the same
# code either way; the kernel tests run several)
RPW = 1 if SHUFFLE else 8
WIDE = 8192


def rows_per_warp(units):
    return RPW * 4 if SHUFFLE and units >= WIDE else RPW
GEMV_ROWS = 4      # up to this many rows run as GEMVs (one pass over the weight per row); more as a GEMM
BM, BN, BK = 32, 32, 32   # GEMM tile: rows of x, rows of w, depth; 16 x 16 threads of 2 x 2 outputs each
BK1 = BK + 1               # a padded tile row: the threads of a warp read distinct banks
PLAIN, RESID, PAIRS = range(3)   # epilogues: out = y, out = y + resid, out = silu(gate) * up


@lru_cache(maxsize=None)
def _weight_element(fmt, sym, group):
    """A device function: w[n, k] as float32 from the format's arrays (a, b, c)."""
    if fmt == "h16":
        @cuda.jit(device=True)
        def element(a, b, c, n, k):
            return float32(a[n, k])
        return element

    @cuda.jit(device=True)
    def element(a, b, c, n, k):
        j = k % 8
        code = float32((a[n, k // 8] >> (8 * (j % 4) + 4 * (j // 4))) & 15)
        s = float32(b[n, k // group])
        if sym:
            return s * (code - float32(8.0))
        return s * code + float32(c[n, k // group])
    return element


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
def _gemv(fmt, K, has_norm, mode, sym, group, rpw):
    NT = WARPS * WARP
    C = K // 8
    permute = fmt == "r4"
    per = 2 if mode == PAIRS else 1   # dot products per unit
    nacc = rpw * per                  # array shapes must be plain constants for the CUDA compiler
    dot = _row_dot(fmt, K, sym, group)

    @cuda.jit
    def gemv(out, x, nw, eps, a, b, c, resid, units):
        # out[t, unit] for t = blockIdx.y, rpw units per warp; units: output rows (plain/resid) or gate/up pairs
        tid = cuda.threadIdx.x
        t = cuda.blockIdx.y
        xs = cuda.shared.array(K, float32)
        red = cuda.shared.array(NT, float32)
        reds = cuda.shared.array((nacc, NT), float32)
        r = float32(1.0)
        if has_norm:
            ss = float32(0.0)
            for k in range(tid, K, NT):
                ss += x[t, k] * x[t, k]
            r = float32(1.0) / math.sqrt(block_sum(ss, red, tid, NT) / float32(K) + float32(eps))
        for k in range(tid, K, NT):
            v = x[t, k] * r * nw[k] if has_norm else x[t, k]
            xs[(k % 8) * C + k // 8 if permute else k] = v
        cuda.syncthreads()
        lane = tid % WARP
        first = (cuda.blockIdx.x * WARPS + tid // WARP) * rpw
        acc = cuda.local.array(nacc, float32)
        for i in range(rpw):
            u = min(first + i, units - 1)   # every warp takes part in the sums (they synchronize)
            for j in range(per):
                acc[i * per + j] = dot(a, b, c, u * per + j, xs, lane)
        warp_sums(acc, nacc, reds, tid)
        if lane == 0:
            for i in range(rpw):
                u = first + i
                if u < units:
                    if mode == PAIRS:
                        g = acc[2 * i]
                        out[t, u] = g / (float32(1.0) + math.exp(-g)) * acc[2 * i + 1]
                    elif mode == RESID:
                        out[t, u] = acc[i] + resid[t, u]
                    else:
                        out[t, u] = acc[i]
    return gemv


@lru_cache(maxsize=None)
def _gemm(fmt, K, has_norm, mode, sym, group):
    element = _weight_element(fmt, sym, group)

    @cuda.jit
    def gemm(out, x, nw, eps, a, b, c, resid, n_rows):
        # tile (blockIdx.y: rows of x, blockIdx.x: rows of w); thread (tx, ty) holds rows 2ty+i, columns 2tx+j
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * 16 + tx
        t0, n0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        T = x.shape[0]
        xa = cuda.shared.array((BM, BK1), float32)
        wa = cuda.shared.array((BN, BK1), float32)
        rr = cuda.shared.array(BM, float32)
        red = cuda.shared.array(256, float32)
        if has_norm:   # 8 threads per row of x: its 1/rms
            row, part = tid // 8, tid % 8
            ss = float32(0.0)
            if t0 + row < T:
                for k in range(part, K, 8):
                    ss += x[t0 + row, k] * x[t0 + row, k]
            red[tid] = ss
            cuda.syncthreads()
            if part == 0:
                s = float32(0.0)
                for i in range(8):
                    s += red[tid + i]
                rr[row] = float32(1.0) / math.sqrt(s / float32(K) + float32(eps))
            cuda.syncthreads()
        acc00 = float32(0.0)
        acc01 = float32(0.0)
        acc10 = float32(0.0)
        acc11 = float32(0.0)
        for k0 in range(0, K, BK):
            for i in range(4):
                idx = tid + 256 * i
                r, kk = idx // BK, idx % BK
                k = k0 + kk
                v = float32(0.0)
                if t0 + r < T and k < K:
                    v = x[t0 + r, k] * rr[r] * nw[k] if has_norm else x[t0 + r, k]
                xa[r, kk] = v
                v = float32(0.0)
                if n0 + r < n_rows and k < K:
                    v = element(a, b, c, n0 + r, k)
                wa[r, kk] = v
            cuda.syncthreads()
            for kk in range(BK):
                x0, x1 = xa[2 * ty, kk], xa[2 * ty + 1, kk]
                w0, w1 = wa[2 * tx, kk], wa[2 * tx + 1, kk]
                acc00 += x0 * w0
                acc01 += x0 * w1
                acc10 += x1 * w0
                acc11 += x1 * w1
            cuda.syncthreads()
        n = n0 + 2 * tx
        for i in range(2):
            t = t0 + 2 * ty + i
            y0, y1 = (acc00, acc01) if i == 0 else (acc10, acc11)
            if t < T and n < n_rows:
                if mode == PAIRS:
                    out[t, n // 2] = y0 / (float32(1.0) + math.exp(-y0)) * y1
                elif mode == RESID:
                    out[t, n] = y0 + resid[t, n]
                    if n + 1 < n_rows:
                        out[t, n + 1] = y1 + resid[t, n + 1]
                else:
                    out[t, n] = y0
                    if n + 1 < n_rows:
                        out[t, n + 1] = y1
    return gemm


def _fields(w):
    """(format name, (a, b, c) arrays, sym, group) of a device linear."""
    if isinstance(w, H16):
        return "h16", (w.w, w.w, w.w), True, 0
    return "r4", (w.words, w.scales, w.mins), w.sym, w.group


def linear(out, x, w, norm=None, eps=0.0, resid=None, pairs=False, rpw=None):
    # see kernels.cuda_ref.linear; device arrays: x float32[T, K], out float32[T, N] (or [T, N/2] in pairs mode);
    # rpw: GEMV rows per warp (default rows_per_warp)
    T, K = x.shape
    N = shape(w)[0]
    fmt, (a, b, c), sym, group = _fields(w)
    mode = PAIRS if pairs else (PLAIN if resid is None else RESID)
    nw = x[0] if norm is None else norm    # never read without a norm
    rs = out if resid is None else resid   # never read without a residual
    if T <= GEMV_ROWS:
        units = N // 2 if pairs else N
        rpw = rpw or rows_per_warp(units)
        kern = _gemv(fmt, K, norm is not None, mode, sym, group, rpw)
        launch(kern, (-(-units // (WARPS * rpw)), T), WARPS * WARP, out, x, nw, eps, a, b, c, rs, units)
    else:
        kern = _gemm(fmt, K, norm is not None, mode, sym, group)
        launch(kern, (-(-N // BN), -(-T // BM)), (16, 16), out, x, nw, eps, a, b, c, rs, N)
    return out


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
