"""The numba.cuda tiled GEMM of a prefill's rows (cuda_linear.dispatch launches it for more than GEMV_ROWS rows):
dense rows of x, or an experts' group of assignments (kernels.cuda_moe), on the device formats H16 and R4 of
kernels.cuda_ref; and the device functions it shares with cuda_linear's GEMV and embedding: a weight element of
either format, a row's expert and routing weight, a LoRA side path's term.
"""
import math
from functools import lru_cache

from numba import cuda, float32, int64

from .cuda_ref import BM

BN, BK = 32, 32   # GEMM tile: BM rows of x (cuda_ref.BM), BN rows of w, depth; 16 x 16 threads of 2 x 2 outputs each
BK1 = BK + 1               # a padded tile row: the threads of a warp read distinct banks
PLAIN, RESID, PAIRS = range(3)   # epilogues: out = y, out = y + resid, out = silu(gate) * up
DENSE, UP, DOWN = range(3)       # which rows: x's; a mixture of experts' gate/up and down (kernels.cuda_moe)


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


@cuda.jit(device=True)
def expert_of(ids, rw, t, j, k, n_experts):
    # row t's j-th expert and its routing weight; j = k: the shared MLP, stacked after the routed experts, weight 1
    if j < k:
        return ids[t * k + j], rw[t * k + j]
    return n_experts, float32(1.0)


@cuda.jit(device=True)
def side_term(lb, lf, ls, lt, n, t, first, step):
    # this thread's share (terms first, first + step, ...) of row n's LoRA update for x row t
    acc = float32(0.0)
    f = lf[n]
    for q in range(first, lb.shape[1], step):
        acc += float32(lb[n, q]) * lt[t, f + q]
    return ls[n] * acc


@lru_cache(maxsize=None)
def _gemm(fmt, K, has_norm, mode, sym, group, moe=DENSE, side=False):
    element = _weight_element(fmt, sym, group)

    @cuda.jit
    def gemm(out, x, nw, eps, a, b, c, resid, n_rows, tiles, order, ids, rw, k, kk, n_experts, lb, lf, ls, lt):
        # a BM x BN tile of out (blockIdx.x: rows of w; thread (tx, ty) holds rows 2ty+i, columns 2tx+j).
        # blockIdx.y: DENSE the x rows from BM * blockIdx.y; UP/DOWN tile i of one expert's group of assignments
        # (tiles[i] = expert, start, end in `order`, which lists assignments t kk + j grouped by expert; an
        # empty tile returns): UP reads x row t and writes out row t kk + j (PAIRS), DOWN reads x row t kk + j and
        # writes out row t kk + j times its routing weight. n_rows: rows of w (per expert when moe); lb, lf, ls,
        # lt: a side path's (as the GEMV's)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * 16 + tx
        n0 = cuda.blockIdx.x * BN
        lo, hi, base = cuda.blockIdx.y * BM, x.shape[0], 0
        if moe != DENSE:
            i = cuda.blockIdx.y
            lo, hi, base = tiles[i, 1], tiles[i, 2], tiles[i, 0] * n_rows
            if lo >= hi:
                return
        xa = cuda.shared.array((BM, BK1), float32)
        wa = cuda.shared.array((BN, BK1), float32)
        rr = cuda.shared.array(BM, float32)
        src = cuda.shared.array(BM, int64)   # the x row of each tile row (-1: past the end)
        red = cuda.shared.array(256, float32)
        if tid < BM:
            s = -1
            if lo + tid < hi:
                s = lo + tid if moe == DENSE else order[lo + tid]
                if moe == UP:
                    s = s // kk
            src[tid] = s
        cuda.syncthreads()
        if has_norm:   # 8 threads per row of x: its 1/rms
            row, part = tid // 8, tid % 8
            ss = float32(0.0)
            if src[row] >= 0:
                for q in range(part, K, 8):
                    ss += x[src[row], q] * x[src[row], q]
            red[tid] = ss
            cuda.syncthreads()
            if part == 0:
                s2 = float32(0.0)
                for q in range(8):
                    s2 += red[tid + q]
                rr[row] = float32(1.0) / math.sqrt(s2 / float32(K) + float32(eps))
            cuda.syncthreads()
        acc00 = float32(0.0)
        acc01 = float32(0.0)
        acc10 = float32(0.0)
        acc11 = float32(0.0)
        live = src[2 * ty] >= 0 and n0 + 2 * tx < n_rows   # outputs past the rows (a short tile's) skip the products
        for k0 in range(0, K, BK):
            for q in range(4):
                idx = tid + 256 * q
                r, kd = idx // BK, idx % BK
                col = k0 + kd
                v = float32(0.0)
                if src[r] >= 0 and col < K:
                    v = x[src[r], col] * rr[r] * nw[col] if has_norm else x[src[r], col]
                xa[r, kd] = v
                v = float32(0.0)
                if n0 + r < n_rows and col < K:
                    v = element(a, b, c, base + n0 + r, col)
                wa[r, kd] = v
            cuda.syncthreads()
            if live:
                for kd in range(BK):
                    x0, x1 = xa[2 * ty, kd], xa[2 * ty + 1, kd]
                    w0, w1 = wa[2 * tx, kd], wa[2 * tx + 1, kd]
                    acc00 += x0 * w0
                    acc01 += x0 * w1
                    acc10 += x1 * w0
                    acc11 += x1 * w1
            cuda.syncthreads()
        n = n0 + 2 * tx
        if side and live:   # live: row 2 ty of x and output n exist; their neighbours are checked here
            s0, s1 = src[2 * ty], src[2 * ty + 1]
            acc00 += side_term(lb, lf, ls, lt, n, s0, 0, 1)
            if n + 1 < n_rows:
                acc01 += side_term(lb, lf, ls, lt, n + 1, s0, 0, 1)
            if s1 >= 0:
                acc10 += side_term(lb, lf, ls, lt, n, s1, 0, 1)
                if n + 1 < n_rows:
                    acc11 += side_term(lb, lf, ls, lt, n + 1, s1, 0, 1)
        for q in range(2):
            pos = lo + 2 * ty + q
            y0, y1 = (acc00, acc01) if q == 0 else (acc10, acc11)
            if pos < hi and n < n_rows:
                t = pos if moe == DENSE else order[pos]
                if moe == DOWN:
                    wt = expert_of(ids, rw, t // kk, t % kk, k, n_experts)[1]
                    y0, y1 = y0 * wt, y1 * wt
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
