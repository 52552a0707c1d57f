"""The device formats of the CUDA backend and the NumPy references of its fused ops (host arrays only; nothing
here imports numba.cuda, so the references and layouts are testable anywhere).

Device linears, prepared once at load from the host formats of tinyhun.kernels.linear:
  H16  w      float16[N, K]                  every float (F32) or INT8 (Q8) weight, rounded to fp16
  R4   words  uint32[N, K/8]                 INT4 codes, one row's words contiguous (a warp streams one row)
       scales float16[N, K/G], mins float16[N, K/G] (the scales again when symmetric), sym, group
A word holds 8 codes of k = 8c..8c+7: byte j's low nibble is k = 8c + j, its high nibble k = 8c + 4 + j, the same
bytes as one row's 4-byte slice of a q4_tiled16 chunk, so R4 is a row gather of that layout, no requantization.
The kernels read fp32 activations (no int8 rounding of x as on the CPU): out = x @ dense(w).T in fp32.
"""
from typing import NamedTuple

import numpy as np

from . import q4, q8
from .linear import F32, Q4, Q8
from .ref import rmsnorm, rope, store_kv


class H16(NamedTuple):
    w: object            # float16[N, K]


class R4(NamedTuple):
    words: object        # uint32[N, K/8]
    scales: object       # float16[N, K/G]
    mins: object         # float16[N, K/G]; the scales when sym (never read then)
    sym: bool
    group: int


def shape(w):
    """(N, K) of a device linear."""
    return (w.w.shape if isinstance(w, H16) else (w.words.shape[0], w.words.shape[1] * 8))


# ---- host formats -> device layouts (host arrays; the backend copies their fields to the device) ----

def r4_of(lin):
    """kernels.linear.Q4 -> R4 of host arrays."""
    tiles, c8, _ = lin.packed.shape
    words = lin.packed.reshape(tiles, c8, q4.TILE, 4).transpose(0, 2, 1, 3).reshape(tiles * q4.TILE, c8 * 4)
    words = np.ascontiguousarray(words[:lin.n]).view(np.uint32)

    def rows(a):
        return np.ascontiguousarray(a.view(np.float16).transpose(0, 2, 1).reshape(tiles * q4.TILE, -1)[:lin.n])
    group = c8 * 8 // lin.scales.shape[1]
    return R4(words, rows(lin.scales), rows(lin.mins), lin.sym, group)


def dense(w):
    """A device linear of host arrays -> float32[N, K], the weight its kernels multiply by."""
    if isinstance(w, H16):
        return w.w.astype(np.float32)
    n = len(w.words)
    b = w.words.view(np.uint8).reshape(n, -1, 4)                       # [N, K/8, j]
    codes = np.stack([b & 15, b >> 4], axis=2).reshape(n, -1, w.group).astype(np.float32)
    s = w.scales.astype(np.float32)[..., None]
    out = s * (codes - 8) if w.sym else s * codes + w.mins.astype(np.float32)[..., None]
    return out.reshape(n, -1)


def device_format(lin):
    """A host linear (F32, Q4, Q8) -> its device linear of host arrays: INT4 stays INT4, the rest fp16."""
    if isinstance(lin, Q4):
        return r4_of(lin)
    if isinstance(lin, Q8):
        return H16(q8.dequantize_q8(lin.weight()).astype(np.float16))
    if isinstance(lin, F32):
        return H16(lin.w.astype(np.float16))
    raise TypeError(f"no device format for {type(lin).__name__}")


def stack(ws, interleave=False):
    """Device linears of host arrays -> one with their rows concatenated (QKV as one GEMV) or, interleave=True,
    alternating (gate_0, up_0, gate_1, ...: a warp computes a gate and its up and writes silu(gate) * up).
    INT4 stays INT4 when all parts share sym and group; otherwise every part goes to fp16."""
    def join(arrays):
        return (np.stack(arrays, axis=1).reshape(-1, arrays[0].shape[1]) if interleave
                else np.concatenate(arrays))
    if all(isinstance(w, R4) for w in ws) and len({(w.sym, w.group) for w in ws}) == 1:
        return R4(join([w.words for w in ws]), join([w.scales for w in ws]), join([w.mins for w in ws]),
                  ws[0].sym, ws[0].group)
    return H16(join([w.w if isinstance(w, H16) else dense(w).astype(np.float16) for w in ws]))


# ---- references of the device ops ----

def linear(out, x, w, norm=None, eps=0.0, resid=None, pairs=False):
    # out = (rmsnorm(x) * norm if norm is given else x) @ dense(w).T, then
    #   pairs:  out[T, N/2] = silu(y[:, 0::2]) * y[:, 1::2]   (w's rows interleaved gate/up, `stack`)
    #   else:   out[T, N]   = y + resid (resid may be out itself: the residual add fused into its producer)
    xin = x if norm is None else rmsnorm(np.empty_like(x), x, norm, eps)
    y = xin @ dense(w).T
    if pairs:
        g, u = y[:, 0::2], y[:, 1::2]
        out[:] = g / (1.0 + np.exp(-g)) * u
    else:
        out[:] = y if resid is None else y + resid
    return out


def embed_rows(out, w, ids):
    # out[T, K] = dense(w)[ids]
    out[:] = dense(w)[ids]
    return out


def rope_qk_store(q, qkv, k_cache, v_cache, cos, sin, slots, positions, q_norm, k_norm, eps):
    # qkv[T, (nh + 2 nkv) d] (one QKV GEMV's output): q[T, nh, d] = its queries after RoPE (row t at
    # positions[t] of the tables cos/sin[S, d/2]) and the per-head QK-norm when q_norm.size; keys the same,
    # stored with the values into k_cache/v_cache[B, nkv, S, d] at (slots[t], positions[t])
    T, nh, d = q.shape
    nkv = k_cache.shape[1]
    qq = qkv[:, :nh * d].reshape(T, nh, d).copy()
    k = qkv[:, nh * d:(nh + nkv) * d].reshape(T, nkv, d).copy()
    v = qkv[:, (nh + nkv) * d:].reshape(T, nkv, d)
    c, s = cos[positions], sin[positions]
    rope(qq, c, s)
    rope(k, c, s)
    if q_norm.size:
        rmsnorm(qq, qq, q_norm, eps)
        rmsnorm(k, k, k_norm, eps)
    q[:] = qq
    store_kv(k_cache, v_cache, k, v, slots, positions)
    return q
