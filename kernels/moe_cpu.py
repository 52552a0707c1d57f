"""Numba versions of the mixture-of-experts ops of tinyhun.kernels.moe: the same names, signatures and results.

Imported by tinyhun.kernels.cpu, which registers the ops these kernels call (`linear`, `silu_mul`): import that
module, not this one alone. `expert(stack, e)` inside Numba code builds the expert's linear from views of the
stacked arrays, one entry per weight format (a new format adds one to EXPERTS).

Decode runs the k experts in two parallel loops, not 3k GEMV launches (each parallel region costs a fork/join, which
on 2 shared cores made a token ~1.3x the dense model's): one over the 16-row tiles of every picked expert's gate and
up, one over the tiles of their downs. A tile is computed by `_tile`, the GEMV tile loop of each weight format
(TILES: F32 rows, q4_cpu's and q8_cpu's vector intrinsics).
"""
import numpy as np
from numba import njit, prange
from numba.core.errors import TypingError
from numba.extending import overload

from . import cpu_linear, moe  # noqa: F401  (cpu_linear registers the Numba `linear`)
from .cpu_math import JIT, compiles_to
from .cpu_matmul import _matmul
from .linear import F32, Q4, Q8, linear
from .q4 import ACT_BLOCK, TILE
from .q4_cpu import _gemv_tile as _q4_gemv_tile
from .q4_cpu import _quantize_acts, _store_tile
from .q8_cpu import _gemv_tile as _q8_gemv_tile
from .ref import silu_mul


def _f32(stack, e):
    return F32(stack.w[e])


def _q4(stack, e):
    return Q4(stack.packed[e], stack.scales[e], stack.mins[e], stack.sym, stack.n)


def _q8(stack, e):
    return Q8(stack.packed[e], stack.scales[e], stack.n)


EXPERTS = {F32: _f32, Q4: _q4, Q8: _q8}


@overload(moe.expert, jit_options=JIT)
def _expert_ov(stack, e):
    view = EXPERTS.get(getattr(stack, "instance_class", None))
    if view is None:
        raise TypingError(f"expert: no expert view for stacked weights of type {stack}")
    return view


def _tile(out, w, tile, x, xq, xd, xqsum, xsum):
    # Numba-only name, typed by _tile_ov per format: out[0, 16 tile : 16 tile + 16] = those rows of w (one
    # expert's linear) . x[K]; the int8 formats read x as _quantize rounded it (xq[K], xd/xqsum/xsum[K/32])
    raise TypingError("_tile is compiled from TILES inside Numba code only")


def _quantize(x, w, acts):
    # Numba-only name, typed by _quantize_ov: acts = x[rows, K] rounded to int8 per 32 (flat) when w's format
    # reads int8 activations
    raise TypingError("_quantize is compiled from TILES inside Numba code only")


def _f32_tile(out, w, tile, x, xq, xd, xqsum, xsum):
    W = w.w
    for r in range(tile * TILE, min(tile * TILE + TILE, W.shape[0])):
        row = W[r]
        s = np.float32(0.0)
        for c in range(x.size):
            s += row[c] * x[c]
        out[0, r] = s


def _q4_tile(out, w, tile, x, xq, xd, xqsum, xsum):
    packed, scales = w.packed, w.scales
    nb, ng = packed.shape[1] // (ACT_BLOCK // 8), scales.shape[1]
    acc = _q4_gemv_tile(tile, nb, ng, nb // ng, xq, xd, xqsum, xsum, packed, scales, w.mins, w.sym)
    _store_tile(out, 0, w.n, tile, acc)


def _q8_tile(out, w, tile, x, xq, xd, xqsum, xsum):
    acc = _q8_gemv_tile(tile, w.scales.shape[1], xq, xd, xqsum, w.packed, w.scales)
    _store_tile(out, 0, w.n, tile, acc)


def _no_quantize(x, w, acts):
    pass


def _int8_acts(x, w, acts):
    _quantize_acts(x, acts.q, acts.d, acts.qsum, acts.xsum)


TILES = {F32: (_f32_tile, _no_quantize), Q4: (_q4_tile, _int8_acts), Q8: (_q8_tile, _int8_acts)}


def _format_of(w, what):
    impl = TILES.get(getattr(w, "instance_class", None))
    if impl is None:
        raise TypingError(f"moe decode: no {what} for weights of type {w}")
    return impl


@overload(_tile, jit_options=JIT)
def _tile_ov(out, w, tile, x, xq, xd, xqsum, xsum):
    return _format_of(w, "GEMV tile")[0]


@overload(_quantize, jit_options=JIT)
def _quantize_ov(x, w, acts):
    return _format_of(w, "activation rounding")[1]


@njit(**JIT)
def _n_tiles(n):
    return -(-n // TILE)


@njit(**JIT)
def _route(ids, weights, probs, x, router):
    # one pass per row: stable softmax, then k selections of the largest remaining probability (strict >, scanning
    # upwards: the lowest index wins a tie), chosen entries marked -2 (below any probability) and restored after
    T, E = x.shape[0], router.shape[0]
    k = ids.size // T
    p = probs.reshape((T, E))
    # never BLAS, at any T: its threads spin after a call, and the experts' Numba GEMMs that follow on the same
    # cores ran at half speed (2 cores: an INT4 MoE prefill 2.1x slower than with OPENBLAS_NUM_THREADS=1). tinyhun
    # shortens that spin (OPENBLAS_THREAD_TIMEOUT, tinyhun/__init__.py) only when it loads before numpy; the
    # router is E rows, a small matmul either way
    _matmul(p, x, router)
    for t in range(T):
        r = p[t]
        m = r[0]
        for e in range(1, E):
            m = max(m, r[e])
        s = np.float32(0.0)
        for e in range(E):
            r[e] = np.exp(r[e] - m)
            s += r[e]
        for e in range(E):
            r[e] = r[e] / s
        total = np.float32(0.0)
        base = t * k
        for j in range(k):
            best, bv = -1, np.float32(-1.0)
            for e in range(E):
                if r[e] > bv:
                    best, bv = e, r[e]
            if best < 0:   # NaN probabilities (a NaN input): the lowest unchosen index, never an invalid one
                best = 0
                while r[best] == np.float32(-2.0):
                    best += 1
                bv = r[best]
            ids[base + j] = best
            weights[base + j] = bv
            total += bv
            r[best] = np.float32(-2.0)
        for j in range(k):
            r[ids[base + j]] = weights[base + j]
            weights[base + j] = weights[base + j] / total


@njit(**JIT)
def _expert_mlp(out, x, gate, up, down, g, u, acts):
    linear(g, x, gate, acts)
    linear(u, x, up, acts)
    silu_mul(g, g, u)
    linear(out, g, down, acts)


@njit(**JIT)
def _prefill(out, x, ids, weights, gate, up, down, order, starts, xg, g, u, y, acts):
    # counting sort of the assignments by expert (stable: rows ascending within an expert), then per expert that
    # has rows: gather, one GEMM each for gate/up/down, weighted scatter-add
    T, H = x.shape
    n_a = ids.size
    k, E, Ie = n_a // T, starts.size - 1, g.size // T
    starts[:] = 0
    for a in range(n_a):
        starts[ids[a] + 1] += 1
    for e in range(E):
        starts[e + 1] += starts[e]
    for a in range(n_a):          # starts[e] is expert e's cursor, ending at its group's end ...
        e = ids[a]
        order[starts[e]] = a
        starts[e] += 1
    for e in range(E, 0, -1):     # ... so shifting by one restores the starts
        starts[e] = starts[e - 1]
    starts[0] = 0
    for e in range(E):
        lo = starts[e]
        n = starts[e + 1] - lo
        if n == 0:
            continue
        xe, ye = xg[:n * H].reshape((n, H)), y[:n * H].reshape((n, H))
        for i in range(n):
            src, dst = x[order[lo + i] // k], xe[i]
            for h in range(H):
                dst[h] = src[h]
        _expert_mlp(ye, xe, moe.expert(gate, e), moe.expert(up, e), moe.expert(down, e),
                    g[:n * Ie].reshape((n, Ie)), u[:n * Ie].reshape((n, Ie)), acts)
        for i in range(n):
            a = order[lo + i]
            w, dst, src = weights[a], out[a // k], ye[i]
            for h in range(H):
                dst[h] += w * src[h]


@njit(parallel=True, **JIT)
def _decode(out, x, ids, weights, gate, up, down, g, u, y, acts):
    # work items: (matrix, tile) over the k gate and k up matrices, then over the k downs; expert j's rows land in
    # its own slice of g/u/y, summed in order j after (deterministic, no two items write one row)
    H, k = x.shape[1], ids.size
    Ie = g.size // k
    nb = Ie // ACT_BLOCK
    if u.size < k * Ie or y.size < k * H or acts.q.size < k * Ie:
        raise ValueError("moe_decode: g, u need k * Ie floats, y k * H, acts k rows of Ie")
    q, d, qsum, xsum = acts.q, acts.d, acts.qsum, acts.xsum
    x0 = x[0]
    _quantize(x, moe.expert(gate, ids[0]), acts)
    tg, td = _n_tiles(Ie), _n_tiles(H)
    for i in prange(2 * k * tg):
        m, tile = i // tg, i % tg
        j = m // 2
        lo = j * Ie
        if m % 2 == 0:
            _tile(g[lo:lo + Ie].reshape((1, Ie)), moe.expert(gate, ids[j]), tile, x0, q, d, qsum, xsum)
        else:
            _tile(u[lo:lo + Ie].reshape((1, Ie)), moe.expert(up, ids[j]), tile, x0, q, d, qsum, xsum)
    gk = g[:k * Ie].reshape((k, Ie))
    silu_mul(gk, gk, u[:k * Ie].reshape((k, Ie)))
    _quantize(gk, moe.expert(down, ids[0]), acts)
    for i in prange(k * td):
        j, tile = i // td, i % td
        _tile(y[j * H:(j + 1) * H].reshape((1, H)), moe.expert(down, ids[j]), tile, gk[j], q[j * Ie:(j + 1) * Ie],
              d[j * nb:(j + 1) * nb], qsum[j * nb:(j + 1) * nb], xsum[j * nb:(j + 1) * nb])
    o = out[0]
    for j in range(k):
        w, yj = weights[j], y[j * H:(j + 1) * H]
        for h in range(H):
            o[h] += w * yj[h]


@njit(**JIT)
def _count(load, ids):
    for a in range(ids.size):
        load[ids[a]] += 1


def route(ids, weights, probs, x, router):
    # as kernels.moe.route
    _route(ids, weights, probs, x, router)
    return ids


def moe_prefill(out, x, ids, weights, gate, up, down, order, starts, xg, g, u, y, acts):
    # as kernels.moe.moe_prefill
    _prefill(out, x, ids, weights, gate, up, down, order, starts, xg, g, u, y, acts)
    return out


def moe_decode(out, x, ids, weights, gate, up, down, g, u, y, acts):
    # as kernels.moe.moe_decode
    _decode(out, x, ids, weights, gate, up, down, g, u, y, acts)
    return out


def count_experts(load, ids):
    _count(load, ids)
    return load


for _op, _kernel in ((moe.route, _route), (moe.moe_prefill, _prefill), (moe.moe_decode, _decode),
                     (moe.count_experts, _count)):
    compiles_to(_op, _kernel)
