"""numba.cuda mixture of experts: `route` (RMSNorm + router + softmax + top-k in one launch), `experts_up` and
`experts_down`, with the signatures of their references in tinyhun.kernels.cuda_ref, on its `Experts` layout (the
E experts' rows stacked, the shared MLP after them as expert E when it has their width and format).

A few rows (decode, T <= GEMV_ROWS) run the dense GEMV with expert rows: experts_up one block row per (row, chosen
expert), so only the k picked experts' weights are read; experts_down one per row, summing its experts' downs
weighted, plus the residual, in order. More rows (prefill) are grouped by expert on the device (`group_rows`: a
stable counting sort and a table of BM-row tiles of each expert's group), then one tiled GEMM launch over all the
tiles for gate/up, one for down, and `combine_rows` adds each row's weighted outputs in order. Nothing crosses to
the host and every sum runs in a fixed order, so results do not depend on scheduling.
"""
import math
from functools import lru_cache

import numpy as np
from numba import cuda, float32, int64

from .cuda_common import SHUFFLE, WARP, block_sum, launch, warp_sum
from .cuda_gemm import DOWN, UP
from .cuda_linear import GEMV_ROWS, dispatch, no_routing
from .cuda_ref import BM, shape

# experts scored at once per row; one warp under the simulator (its cost is its threads)
ROUTER_WARPS = 4 if SHUFFLE else 1


def n_tiles(T, kk, groups):
    """Rows of the tile table for T rows of kk assignments over `groups` experts: each group's last tile may be
    partial, so at most T kk / BM + groups tiles."""
    return T * kk // BM + groups


@lru_cache(maxsize=None)
def _route(E, H):
    NT = ROUTER_WARPS * WARP

    @cuda.jit
    def kern(ids, weights, x, router, nw, eps, k):
        # block t: xs = rmsnorm(x[t]) * nw, p[e] = xs . router[e] (a warp per expert), then one thread: softmax
        # (max subtracted), k picks of the largest remaining probability (strict >: the lowest index wins a tie),
        # renormalised, as kernels.moe_cpu._route
        t, tid = cuda.blockIdx.x, cuda.threadIdx.x
        lane, warp = tid % WARP, tid // WARP
        xs = cuda.shared.array(H, float32)
        red = cuda.shared.array(NT, float32)
        p = cuda.shared.array(E, float32)
        ss = float32(0.0)
        for h in range(tid, H, NT):
            ss += x[t, h] * x[t, h]
        r = float32(1.0) / math.sqrt(block_sum(ss, red, tid, NT) / float32(H) + float32(eps))
        for h in range(tid, H, NT):
            xs[h] = x[t, h] * r * nw[h]
        cuda.syncthreads()
        for e0 in range(0, E, ROUTER_WARPS):   # the same trip count for every warp (the sums synchronize)
            e = min(e0 + warp, E - 1)
            s = float32(0.0)
            for h in range(lane, H, WARP):
                s += router[e, h] * xs[h]
            s = warp_sum(s, red, tid)
            if lane == 0 and e0 + warp < E:
                p[e] = s
        cuda.syncthreads()
        if tid == 0:
            m = p[0]
            for e in range(1, E):
                m = max(m, p[e])
            total = float32(0.0)
            for e in range(E):
                p[e] = math.exp(p[e] - m)
                total += p[e]
            for e in range(E):
                p[e] = p[e] / total
            picked = float32(0.0)
            for j in range(k):
                best, bv = -1, float32(-1.0)
                for e in range(E):
                    if p[e] > bv:
                        best, bv = e, p[e]
                if best < 0:   # NaN probabilities: the lowest unchosen index, never an invalid one
                    best = 0
                    while p[best] == float32(-2.0):
                        best += 1
                    bv = p[best]
                ids[t * k + j] = best
                weights[t * k + j] = bv
                picked += bv
                p[best] = float32(-2.0)
            for j in range(k):
                weights[t * k + j] = weights[t * k + j] / picked
    return kern, NT


def route(ids, weights, x, router, norm, eps):
    # see kernels.cuda_ref.route; device arrays ids int64[T k], weights float32[T k], x float32[T, H],
    # router float32[E, H], norm float32[H]
    T, H = x.shape
    kern, nt = _route(router.shape[0], H)
    launch(kern, T, nt, ids, weights, x, router, norm, eps, ids.size // T)
    return ids


@lru_cache(maxsize=None)
def _group(groups):
    NT = max(WARP, -(-groups // WARP) * WARP)

    @cuda.jit
    def kern(order, tiles, ids, T, k, kk):
        # thread g counts expert g's assignments; thread 0 turns the counts into group starts and the tile table;
        # thread g then lists its group's assignments t kk + j in increasing order (a stable sort)
        g = cuda.threadIdx.x
        count = cuda.shared.array(NT, int64)
        start = cuda.shared.array(NT, int64)
        if g < groups:
            c = 0
            for t in range(T):
                for j in range(kk):
                    if (ids[t * k + j] if j < k else groups - 1) == g:   # j = k: the shared MLP
                        c += 1
            count[g] = c
        cuda.syncthreads()
        if g == 0:
            pos, i = 0, 0
            for e in range(groups):
                start[e] = pos
                for lo in range(pos, pos + count[e], BM):
                    tiles[i, 0] = e
                    tiles[i, 1] = lo
                    tiles[i, 2] = min(lo + BM, pos + count[e])
                    i += 1
                pos += count[e]
            for rest in range(i, tiles.shape[0]):   # empty tiles: their GEMM blocks return at once
                tiles[rest, 0] = 0
                tiles[rest, 1] = 0
                tiles[rest, 2] = 0
        cuda.syncthreads()
        if g < groups:
            at = start[g]
            for t in range(T):
                for j in range(kk):
                    if (ids[t * k + j] if j < k else groups - 1) == g:
                        order[at] = t * kk + j
                        at += 1
    return kern, NT


def group_rows(order, tiles, ids, groups, kk):
    # see kernels.cuda_ref.group_rows; device arrays order int64[T kk], tiles int64[n_tiles(T, kk, groups), 3]
    T = order.size // kk
    kern, nt = _group(groups)
    launch(kern, 1, nt, order, tiles, ids, T, ids.size // T, kk)
    return order


@cuda.jit
def _combine(out, y, resid, kk):
    # out[t] = resid[t] + sum_j y[t kk + j], j in order
    t = cuda.blockIdx.x
    for h in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        s = resid[t, h]
        for j in range(kk):
            s += y[t * kk + j, h]
        out[t, h] = s


def _routing(ex, ids, weights, scratch, T):
    # cuda_linear.dispatch's routing arguments for this layer's T rows (weights None: not read)
    k = ex.topk
    kk = k + ex.shared
    weights = no_routing()[1] if weights is None else weights[:T * k]
    return scratch.tiles[:n_tiles(T, kk, ex.n_experts + ex.shared)], scratch.order[:T * kk], ids[:T * k], weights, \
        k, kk, ex.n_experts


def experts_up(h, x, ex, ids, norm, eps, scratch):
    # see kernels.cuda_ref.experts_up; h float32[T kk, Ie]; scratch: MoEScratch (order, tiles: a prefill's groups)
    T = x.shape[0]
    routing = _routing(ex, ids, None, scratch, T)
    if T > GEMV_ROWS:
        group_rows(routing[1], routing[0], routing[2], ex.n_experts + ex.shared, routing[5])
    dispatch(h, x, ex.gate_up, norm, eps, None, True, None, UP, T, shape(ex.gate_up)[0] // (ex.n_experts + ex.shared),
             routing)
    return h


def experts_down(out, h, ex, ids, weights, resid, scratch):
    # see kernels.cuda_ref.experts_down; out, resid float32[T, H] (out may be resid); scratch.y: a prefill's
    # weighted expert outputs [T kk, H]; the groups experts_up built for these rows
    T, H = out.shape
    routing = _routing(ex, ids, weights, scratch, T)
    kk = routing[5]
    if T <= GEMV_ROWS:
        dispatch(out, h, ex.down, None, 0.0, resid, False, None, DOWN, T, H, routing)
    else:
        y = scratch.y[:T * kk * H].reshape(T * kk, H)
        dispatch(y, h, ex.down, None, 0.0, None, False, None, DOWN, T, H, routing)
        launch(_combine, T, min(128, max(WARP, -(-H // WARP) * WARP)), out, y, resid, kk)
    return out


class MoEScratch:
    """Device scratch of a mixture of experts for up to R rows, the largest k, kk, Ie over the layers (flat where
    the layers' widths differ; `views` shapes them for one layer)."""

    def __init__(self, cuda_, R, H, k, kk, width, groups):
        self.ids = cuda_.device_array(R * k, np.int64)
        self.weights = cuda_.device_array(R * k, np.float32)
        self.h = cuda_.device_array(R * kk * width, np.float32)
        self.y = cuda_.device_array(R * kk * H, np.float32)
        self.order = cuda_.device_array(R * kk, np.int64)
        self.tiles = cuda_.device_array((n_tiles(R, kk, groups), 3), np.int64)

    def h_rows(self, T, kk, width):
        return self.h[:T * kk * width].reshape(T * kk, width)
