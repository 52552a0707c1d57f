"""NumPy reference kernels. Every op writes into `out` (preallocated by the caller) and returns it.

Shapes: T rows (tokens), H hidden, nh/nkv query/key-value heads, d head_dim, S cache length, B cache slots.
Weights are stored as checkpoints store them, [out_features, in_features], so y = x @ w.T. The Numba versions in
tinyhun.kernels.cpu have the same names and signatures, and are what these names compile to inside Numba code.
"""
import numpy as np


def matmul(out, x, w):
    # out[T, N] = x[T, K] @ w[N, K].T (fp32); NumPy's BLAS streams a C-contiguous [N, K] weight fastest this way
    np.matmul(x, w.T, out=out)
    return out


def rmsnorm(out, x, w, eps):
    # out[..., n] = x / rms(x) * w, computed in fp32 whatever x holds
    xf = x.astype(np.float32, copy=False)
    r = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + np.float32(eps))
    np.multiply(xf * r, w, out=out)
    return out


def add_rmsnorm(out, resid, x, w, eps):
    # resid[T, n] += x[T, n] in place (the residual stream), then out[T, n] = rmsnorm(resid) * w
    np.add(resid, x, out=resid)
    return rmsnorm(out, resid, w, eps)


def rope(x, cos, sin):
    # in place: x[T, n_heads, d] rotated NeoX style (i pairs with i + d/2); cos/sin[T, d/2], row t's angles
    half = x.shape[-1] // 2
    a = x[..., :half].copy()
    b = x[..., half:]
    c = cos[:, None, :]
    s = sin[:, None, :]
    x[..., :half] = a * c - b * s
    x[..., half:] = b * c + a * s
    return x


def store_kv(k_cache, v_cache, k, v, slots, positions):
    # k_cache/v_cache[B, nkv, S, d]: row t's keys/values k, v[T, nkv, d] go to slot slots[t], position positions[t]
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = v
    return k_cache


def attention_rows(out, q, k_cache, v_cache, slots, positions):
    # out[T, nh, d]: row t's queries q[t] attend causally (GQA, softmax(q k^T / sqrt(d)) v) to keys 0..positions[t]
    # of cache slot slots[t]; k_cache/v_cache[B, nkv, S, d] already hold them. Rows are independent: a prefill
    # chunk is T rows of one slot at consecutive positions, a batch decode step one row per slot.
    T, nh, d = q.shape
    group = nh // k_cache.shape[1]
    scale = np.float32(1.0 / np.sqrt(d))
    for t in range(T):
        n = positions[t] + 1
        kc, vc = k_cache[slots[t], :, :n], v_cache[slots[t], :, :n]      # [nkv, n, d]
        qt = q[t].reshape(-1, group, d)                                   # [nkv, group, d]
        s = (qt @ kc.transpose(0, 2, 1)) * scale                          # [nkv, group, n]
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out[t] = (p @ vc).reshape(nh, d)
    return out


def attention(out, q, k_cache, v_cache, pos):
    # one sequence: out[T, nh, d] for queries at positions pos..pos+T-1 over k_cache/v_cache[nkv, S, d]
    T = q.shape[0]
    return attention_rows(out, q, k_cache[None], v_cache[None], np.zeros(T, np.int64), pos + np.arange(T))


def silu_mul(out, gate, up):
    # out = silu(gate) * up, elementwise
    np.multiply(gate / (1.0 + np.exp(-gate)), up, out=out)
    return out


def add(out, a, b):
    np.add(a, b, out=out)
    return out
