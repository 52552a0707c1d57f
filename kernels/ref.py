"""NumPy reference kernels. Every op writes into `out` (preallocated by the caller) and returns it.

Shapes: T tokens, H hidden, nh/nkv query/key-value heads, d head_dim, S cache length. Weights are stored
as checkpoints store them, [out_features, in_features], so y = x @ w.T.
"""
import numpy as np

from .q4 import matmul_q4
from .q8 import Q8Weight, matmul_q8


def matmul(out, x, w):
    # out[T, N] = x[T, K] @ w[N, K].T ; NumPy's BLAS streams a C-contiguous [N, K] weight fastest this way.
    # w may also be an INT4 Q4Weight (kernels/q4.py) or an INT8 Q8Weight (kernels/q8.py)
    if isinstance(w, Q8Weight):
        return matmul_q8(out, x, w)
    if not isinstance(w, np.ndarray):
        return matmul_q4(out, x, w)
    np.matmul(x, w.T, out=out)
    return out


def rmsnorm(out, x, w, eps):
    # out[..., n] = x / rms(x) * w, computed in fp32 whatever x holds
    xf = x.astype(np.float32, copy=False)
    r = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + np.float32(eps))
    np.multiply(xf * r, w, out=out)
    return out


def rope(x, cos, sin):
    # in place: x[T, n_heads, d] rotated NeoX style (i pairs with i + d/2); cos/sin[T, d/2]
    half = x.shape[-1] // 2
    a = x[..., :half].copy()
    b = x[..., half:]
    c = cos[:, None, :]
    s = sin[:, None, :]
    x[..., :half] = a * c - b * s
    x[..., half:] = b * c + a * s
    return x


def attention(out, q, k_cache, v_cache, pos):
    # out[T, nh, d] = causal GQA softmax(q k^T / sqrt(d)) v for queries at positions pos..pos+T-1;
    # k_cache/v_cache[nkv, S, d] already hold keys/values for positions 0..pos+T-1
    T, nh, d = q.shape
    nkv = k_cache.shape[0]
    group = nh // nkv
    n = pos + T
    scale = np.float32(1.0 / np.sqrt(d))
    causal = np.arange(n)[None, :] > (pos + np.arange(T))[:, None]      # [T, n] True where masked
    for h in range(nkv):
        qh = q[:, h * group:(h + 1) * group, :].transpose(1, 0, 2)       # [group, T, d]
        s = (qh @ k_cache[h, :n].T) * scale                               # [group, T, n]
        s[:, causal] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out[:, h * group:(h + 1) * group, :] = (p @ v_cache[h, :n]).transpose(1, 0, 2)
    return out


def silu_mul(out, gate, up):
    # out = silu(gate) * up, elementwise
    np.multiply(gate / (1.0 + np.exp(-gate)), up, out=out)
    return out


def add(out, a, b):
    np.add(a, b, out=out)
    return out


def prepare_layer(lw):
    """A layer's weight tuple as this backend's decoder_layer takes it (here: as is)."""
    return lw


def decoder_layer(x, bufs, lw, k_cache, v_cache, pos, cos, sin, heads, eps):
    """One pre-norm decoder layer over T tokens at positions pos..pos+T-1, updating x[T, H] in place and
    appending their keys/values to k_cache/v_cache [nkv, S, d].

    bufs = (xn, q, k, v, attn, proj, gate, up, acts), each [T, width] but acts (int8 activation scratch that only
    the Numba backend uses); lw = prepare_layer((attn_norm, wq, wk, wv, q_norm, k_norm, wo, mlp_norm, w_gate,
    w_up, w_down)) with empty q_norm/k_norm when the model has no QK-norm; heads = (nh, nkv, d).
    """
    xn, q, k, v, attn, proj, gate, up = bufs[:8]
    attn_norm, wq, wk, wv, q_norm, k_norm, wo, mlp_norm, w_gate, w_up, w_down = lw
    nh, nkv, d = heads
    T = x.shape[0]
    rmsnorm(xn, x, attn_norm, eps)
    matmul(q, xn, wq)
    matmul(k, xn, wk)
    matmul(v, xn, wv)
    q3, k3 = q.reshape(T, nh, d), k.reshape(T, nkv, d)
    rope(q3, cos, sin)
    rope(k3, cos, sin)
    if q_norm.size:   # Hunyuan normalises q and k per head after RoPE (the reverse of Qwen3)
        rmsnorm(q3, q3, q_norm, eps)
        rmsnorm(k3, k3, k_norm, eps)
    k_cache[:, pos:pos + T] = k3.transpose(1, 0, 2)
    v_cache[:, pos:pos + T] = v.reshape(T, nkv, d).transpose(1, 0, 2)
    attention(attn.reshape(T, nh, d), q3, k_cache, v_cache, pos)
    matmul(proj, attn, wo)
    add(x, x, proj)
    rmsnorm(xn, x, mlp_norm, eps)
    matmul(gate, xn, w_gate)
    matmul(up, xn, w_up)
    silu_mul(gate, gate, up)
    matmul(proj, gate, w_down)
    add(x, x, proj)
    return x
