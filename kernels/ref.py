"""NumPy reference kernels. Every op writes into `out` (preallocated by the caller) and returns it.

Shapes: T rows (tokens), H hidden, nh/nkv query/key-value heads, d head_dim; the KV cache's layout and ops are
kernels/kv.py's.
Weights are stored as checkpoints store them, [out_features, in_features], so y = x @ w.T. The Numba versions in
tinyhun.kernels.cpu have the same names and signatures, and are what these names compile to inside Numba code.
"""
import numpy as np

from .kv import attention_rows, store_kv  # noqa: F401  (the paged KV cache's ops: kernels/kv.py)


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


def silu_mul(out, gate, up):
    # out = silu(gate) * up, elementwise
    np.multiply(gate / (1.0 + np.exp(-gate)), up, out=out)
    return out


def add(out, a, b):
    np.add(a, b, out=out)
    return out
