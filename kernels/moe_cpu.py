"""Numba versions of the mixture-of-experts ops of tinyhun.kernels.moe: the same names, signatures and results.

Imported by tinyhun.kernels.cpu, which registers the ops these kernels call (`linear`, `silu_mul`): import that
module, not this one alone. `expert(stack, e)` inside Numba code builds the expert's linear from views of the
stacked arrays, one entry per weight format (a new format adds one to EXPERTS).
"""
import numpy as np
from numba import njit
from numba.core.errors import TypingError
from numba.extending import overload

from . import cpu_linear, moe  # noqa: F401  (cpu_linear registers the Numba `linear`)
from .cpu_math import JIT, compiles_to
from .cpu_matmul import BLAS_T, _matmul
from .linear import F32, Q4, Q8, linear
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


@njit(**JIT)
def _route(ids, weights, probs, x, router):
    # one pass per row: stable softmax, then k selections of the largest remaining probability (strict >, scanning
    # upwards: the lowest index wins a tie), chosen entries marked -2 (below any probability) and restored after
    T, E = x.shape[0], router.shape[0]
    k = ids.size // T
    p = probs.reshape((T, E))
    if T < BLAS_T:
        _matmul(p, x, router)
    else:
        np.dot(x, router.T, p)
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


@njit(**JIT)
def _decode(out, x, ids, weights, gate, up, down, g, u, y, acts):
    H, Ie = x.shape[1], g.size
    ye, ge, ue = y.reshape((1, H)), g.reshape((1, Ie)), u.reshape((1, Ie))
    o = out[0]
    for j in range(ids.size):
        e = ids[j]
        _expert_mlp(ye, x, moe.expert(gate, e), moe.expert(up, e), moe.expert(down, e), ge, ue, acts)
        w = weights[j]
        for h in range(H):
            o[h] += w * y[h]


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
