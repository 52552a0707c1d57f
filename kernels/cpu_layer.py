"""One decoder layer in a single Numba call: kernels.ref.decoder_layer with the Numba kernels, no Python between.

A layer is ~15 kernel calls; from Python each costs a few µs of wrapping, checking and dispatch (an INT4 matmul's
wrapper alone ~5 µs), which on SmolLM2 (30 layers) added ~3 ms to a ~10 ms token. Compiled together they cost
nothing. Each matrix is either a float32 array or an INT4 tuple (packed, scales as u16, mins as u16, sym) made
once by `prepare_layer`; `_linear` picks the kernel at compile time.
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from .cpu import BLAS_T, _add, _add_rmsnorm, _matmul, _rmsnorm, _rope, _silu_mul
from .cpu_attention import attention_kernel
from .cpu_math import JIT
from .q4 import ACT_BLOCK, Q4Weight
from .q4_cpu import _gemm, _gemv


def prepare_layer(lw):
    """ref's layer tuple -> this module's: Q4Weight objects become plain array tuples Numba can take."""
    def arg(w):
        if isinstance(w, Q4Weight):
            scales = w.scales.view(np.uint16)
            return (w.packed, scales, scales if w.sym else w.mins.view(np.uint16), w.sym)
        return w
    return tuple(arg(w) for w in lw)


def _linear(out, x, w, acts):
    pass


@overload(_linear, jit_options=JIT)
def _linear_impl(out, x, w, acts):
    if isinstance(w, types.Array):
        def fp32(out, x, w, acts):
            if x.shape[0] < BLAS_T:
                _matmul(out, x, w)
            else:
                np.dot(x, w.T, out)
        return fp32

    def int4(out, x, w, acts):
        packed, scales, mins, sym = w
        t, k = x.shape
        nb = k // ACT_BLOCK
        xq = acts[0][:t * k].reshape((t, k))
        xd = acts[1][:t * nb].reshape((t, nb))
        qsum = acts[2][:t * nb].reshape((t, nb))
        xsum = acts[3][:t * nb].reshape((t, nb))
        if t == 1:
            _gemv(out, x, xq, xd, qsum, xsum, packed, scales, mins, sym)
        else:
            _gemm(out, x, xq, xd, qsum, xsum, packed, scales, mins, sym)
    return int4


@njit(**JIT)
def decoder_layer(x, bufs, lw, k_cache, v_cache, pos, cos, sin, heads, eps):
    # the signature and semantics of kernels.ref.decoder_layer; bufs carries a 9th entry, the int8 activation
    # scratch (q int8, d f32, qsum i32, xsum f32; flat, sized for the widest matmul input)
    xn, q, k, v, attn, proj, gate, up, acts = bufs
    attn_norm, wq, wk, wv, q_norm, k_norm, wo, mlp_norm, w_gate, w_up, w_down = lw
    nh, nkv, d = heads
    T = x.shape[0]
    _rmsnorm(xn, x, attn_norm, eps)
    _linear(q, xn, wq, acts)
    _linear(k, xn, wk, acts)
    _linear(v, xn, wv, acts)
    q3, k3, v3 = q.reshape((T, nh, d)), k.reshape((T, nkv, d)), v.reshape((T, nkv, d))
    _rope(q3, cos, sin)
    _rope(k3, cos, sin)
    if q_norm.size:   # Hunyuan normalises q and k per head after RoPE
        _rmsnorm(q3, q3, q_norm, eps)
        _rmsnorm(k3, k3, k_norm, eps)
    for t in range(T):
        for h in range(nkv):
            k_cache[h, pos + t, :] = k3[t, h, :]
            v_cache[h, pos + t, :] = v3[t, h, :]
    attention_kernel(attn.reshape((T, nh, d)), q3, k_cache, v_cache, pos)
    _linear(proj, attn, wo, acts)
    _add_rmsnorm(xn, x, proj, mlp_norm, eps)
    _linear(gate, xn, w_gate, acts)
    _linear(up, xn, w_up, acts)
    _silu_mul(gate, gate, up)
    _linear(proj, gate, w_down, acts)
    _add(x, x, proj)
    return x
