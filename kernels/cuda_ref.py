"""The device formats of the CUDA backend and the NumPy references of its fused ops (host arrays only; nothing
here imports numba.cuda, so the references and layouts are testable anywhere).

Device linears, prepared once at load from the host formats of tinyhun.kernels.linear:
  H16  w      float16[N, K]                  every float (F32) or INT8 (Q8) weight, rounded to fp16
  R4   words  uint32[N, K/8]                 INT4 codes, one row's words contiguous (a warp streams one row)
       scales float16[N, K/G], mins float16[N, K/G] (the scales again when symmetric), sym, group
A word holds 8 codes of k = 8c..8c+7: byte j's low nibble is k = 8c + j, its high nibble k = 8c + 4 + j, the same
bytes as one row's 4-byte slice of a q4_tiled16 chunk, so R4 is a row gather of that layout, no requantization.
The kernels read fp32 activations (no int8 rounding of x as on the CPU): out = x @ dense(w).T in fp32.

An adapter's LoRA side path stays beside its base (`Adapted`: the base device linear and its `Side`): the kernels
compute t = x_in @ A.T for every adapted part of a (stacked) linear in one GEMV first, then add each output row's
scale * B[n] . t[its part's columns] inside the base's GEMV or GEMM, before its epilogue (so gate and up get their
updates before silu(gate) * up).

A mixture of experts (`Experts`) is two device linears of all its experts' rows: gate_up [G 2 Ie, H] (expert e's
rows 2 e Ie.., gate and up interleaved as `stack` does) and down [G H, Ie], G = E experts, and the shared MLP as
expert E when it has the experts' width and device format (`shared`), so it runs in the same launches as the
routed experts. Row t's assignments are t kk + j: its k routed experts (j < k), then the shared MLP (j = k).
"""
from typing import NamedTuple

import numpy as np

from . import moe, q4, q8
from .linear import F32, LoRA, Q4, Q8, lora_b, side_path
from .kv import store_kv
from .ref import rmsnorm, rope

BM = 32   # rows of a prefill GEMM tile (kernels.cuda_linear.BM): the tiles of group_rows


class H16(NamedTuple):
    w: object            # float16[N, K]


class R4(NamedTuple):
    words: object        # uint32[N, K/8]
    scales: object       # float16[N, K/G]
    mins: object         # float16[N, K/G]; when sym the scales array itself (never read; not stored twice)
    sym: bool
    group: int


class Side(NamedTuple):
    """The LoRA side path of a device linear [N, K] whose parts (q, k, v of a stacked QKV; gate, up) are adapted
    at ranks up to r. A and B are fp16 as the CPU keeps them beside a quantized base (each divided by a power of
    two that fp16's range holds; the powers are in scale)."""
    a: object            # H16 [P r, K]: the P adapted parts' lora_A, each padded to r rows with zeros (so every
    #                      column of t a row reads was computed, and no stale value meets a zero of B)
    b: object            # float16[N, r]: lora_B's rows in the linear's row order; zeros past a part's rank and in
    #                      the rows of parts not adapted
    first: object        # int32[N]: the column of t where each row's part starts (p r)
    scale: object        # float32[N]: each row's part's scale (lora_alpha / rank, times the powers of two); 0: none


class Adapted(NamedTuple):
    base: object         # H16 or R4
    side: Side


def shape(w):
    """(N, K) of a device linear."""
    if isinstance(w, Adapted):
        w = w.base
    return (w.w.shape if isinstance(w, H16) else (w.words.shape[0], w.words.shape[1] * 8))


def side_of(lin):
    """kernels.linear.LoRA -> the Side of that one linear (fp16: a float32 side path is rounded as the CPU rounds
    one beside a quantized base)."""
    if lin.a.dtype != np.uint16:
        lin = side_path(lin.base, lin.a, lora_b(lin), lin.scale, half=True)
    n, r = lin.shape[0], lin.a.shape[0]
    b = lin.b.view(np.float16).transpose(0, 2, 1).reshape(-1, r)[:n]
    return Side(H16(lin.a.view(np.float16)), np.ascontiguousarray(b), np.zeros(n, np.int32),
                np.full(n, lin.scale, np.float32))


def join_sides(sides, rows, join):
    """The Side of a stacked linear from its parts' (None: a part not adapted; rows: each part's row count),
    their rows joined by `join` as the bases' are."""
    r = max(s.b.shape[1] for s in sides if s is not None)
    k = next(s.a.w.shape[1] for s in sides if s is not None)
    a, b, first, scale = [], [], [], []
    for s, n in zip(sides, rows):
        bs, fs, ss = np.zeros((n, r), np.float16), np.zeros(n, np.int32), np.zeros(n, np.float32)
        if s is not None:
            rs = s.b.shape[1]
            fs[:], ss[:], bs[:, :rs] = len(a) * r, s.scale, s.b
            pa = np.zeros((r, k), np.float16)
            pa[:rs] = s.a.w
            a.append(pa)
        b.append(bs)
        first.append(fs)
        scale.append(ss)
    return Side(H16(np.concatenate(a)), *(join(m) for m in (b, first, scale)))


# ---- host formats -> device layouts (host arrays; the backend copies their fields to the device) ----

def r4_of(lin):
    """kernels.linear.Q4 -> R4 of host arrays."""
    tiles, c8, _ = lin.packed.shape
    words = lin.packed.reshape(tiles, c8, q4.TILE, 4).transpose(0, 2, 1, 3).reshape(tiles * q4.TILE, c8 * 4)
    words = np.ascontiguousarray(words[:lin.n]).view(np.uint32)

    def rows(a):
        return np.ascontiguousarray(a.view(np.float16).transpose(0, 2, 1).reshape(tiles * q4.TILE, -1)[:lin.n])
    group = c8 * 8 // lin.scales.shape[1]
    scales = rows(lin.scales)
    return R4(words, scales, scales if lin.sym else rows(lin.mins), lin.sym, group)


def dense(w):
    """A device linear of host arrays -> float32[N, K], the weight its kernels multiply by (an adapter's update
    merged in: row n + scale[n] * B[n] @ A[its part's rows])."""
    if isinstance(w, Adapted):
        out, s = dense(w.base), w.side
        r = s.b.shape[1]
        a = s.a.w.astype(np.float32)
        for f in np.unique(s.first):
            m = s.first == f
            out[m] += s.scale[m, None] * (s.b[m].astype(np.float32) @ a[f:f + r])
        return out
    if isinstance(w, H16):
        return w.w.astype(np.float32)
    n = len(w.words)
    b = w.words.view(np.uint8).reshape(n, -1, 4)                       # [N, K/8, j]
    codes = np.stack([b & 15, b >> 4], axis=2).reshape(n, -1, w.group).astype(np.float32)
    s = w.scales.astype(np.float32)[..., None]
    out = s * (codes - 8) if w.sym else s * codes + w.mins.astype(np.float32)[..., None]
    return out.reshape(n, -1)


def device_format(lin):
    """A host linear (F32, Q4, Q8, LoRA) -> its device linear of host arrays: INT4 stays INT4, the rest fp16; a
    LoRA stays a side path (Adapted)."""
    if isinstance(lin, LoRA):
        return Adapted(device_format(lin.base), side_of(lin))
    if isinstance(lin, Q4):
        return r4_of(lin)
    if isinstance(lin, Q8):
        return H16(q8.dequantize_q8(lin.weight()).astype(np.float16))
    if isinstance(lin, F32):
        return H16(lin.w.astype(np.float16))
    raise TypeError(f"no device format for {type(lin).__name__}")


def joiner(interleave):
    """Arrays of rows -> one: concatenated, or interleaved (row 0 of each, then row 1 of each, ...)."""
    def join(arrays):
        return (np.stack(arrays, axis=1).reshape(-1, *arrays[0].shape[1:]) if interleave
                else np.concatenate(arrays))
    return join


def stack(ws, interleave=False):
    """Device linears of host arrays -> one with their rows concatenated (QKV as one GEMV) or, interleave=True,
    alternating (gate_0, up_0, gate_1, ...: a warp computes a gate and its up and writes silu(gate) * up).
    INT4 stays INT4 when all parts share sym and group; otherwise every part goes to fp16. Adapted parts give an
    Adapted stack (join_sides)."""
    join = joiner(interleave)
    sides = [w.side if isinstance(w, Adapted) else None for w in ws]
    if any(s is not None for s in sides):
        ws = [w.base if isinstance(w, Adapted) else w for w in ws]
        return Adapted(stack(ws, interleave), join_sides(sides, [shape(w)[0] for w in ws], join))
    if all(isinstance(w, R4) for w in ws) and len({(w.sym, w.group) for w in ws}) == 1:
        scales = join([w.scales for w in ws])
        return R4(join([w.words for w in ws]), scales, scales if ws[0].sym else join([w.mins for w in ws]),
                  ws[0].sym, ws[0].group)
    return H16(join([w.w if isinstance(w, H16) else dense(w).astype(np.float16) for w in ws]))


class Experts(NamedTuple):
    gate_up: object      # device linear [G 2 Ie, H]: per expert its gate/up rows interleaved
    down: object         # device linear [G H, Ie]
    n_experts: int       # E routed experts (G = E + shared)
    topk: int            # k
    shared: int          # 1: the shared MLP is expert E, added to every row with weight 1; 0: none stacked


def experts_of(gate, up, down, topk, shared=None):
    """A layer's stacked host expert linears (kernels.moe.stack_linears) and its shared structs.DenseMLP (None:
    none) -> (Experts of host arrays, the shared MLP's (gate_up, down) when it could not be stacked with them,
    else None). The shared MLP is stacked when its rows come out in the experts' device format and width."""
    E = len(gate[0])   # every format's first field holds the experts along its leading axis
    gate_up = [stack([device_format(moe.expert(gate, e)), device_format(moe.expert(up, e))], interleave=True)
               for e in range(E)]
    downs = [device_format(moe.expert(down, e)) for e in range(E)]
    extra = None
    if shared is not None:
        extra = (stack([device_format(shared.gate), device_format(shared.up)], interleave=True),
                 device_format(shared.down))

        def kind(w):
            return type(w), shape(w), (w.sym, w.group) if isinstance(w, R4) else ()
        if kind(extra[0]) == kind(gate_up[0]) and kind(extra[1]) == kind(downs[0]):
            gate_up.append(extra[0])
            downs.append(extra[1])
            extra = None
    stacked = len(gate_up) - E
    return Experts(stack(gate_up), stack(downs), E, topk, stacked), extra


# ---- references of the device ops ----

def linear(out, x, w, norm=None, eps=0.0, resid=None, pairs=False):
    # out = (rmsnorm(x) * norm if norm is given else x) @ dense(w).T, then
    #   pairs:  out[T, N/2] = silu(y[:, 0::2]) * y[:, 1::2]   (w's rows interleaved gate/up, `stack`)
    #   else:   out[T, N]   = y + resid (resid may be out itself: the residual add fused into its producer)
    # where an Adapted w's y[:, n] gains scale[n] * B[n] . t[:, first[n]:first[n] + r], t = xin @ A.T
    xin = x if norm is None else rmsnorm(np.empty_like(x), x, norm, eps)
    if isinstance(w, Adapted):
        s = w.side
        t = xin @ dense(s.a).T
        cols = s.first[:, None] + np.arange(s.b.shape[1])
        y = xin @ dense(w.base).T + s.scale * np.einsum("tnr,nr->tn", t[:, cols], s.b.astype(np.float32))
    else:
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


def argmax_rows(out, x):
    # out int64[T] = the index of each row's largest value in float32[T, V], ties to the lowest (np.argmax's rule)
    out[:] = np.argmax(x, axis=1)
    return out


def rope_qk_store(q, qkv, kv, cos, sin, tables, slots, positions, q_norm, k_norm, eps):
    # qkv[T, (nh + 2 nkv) d] (one QKV GEMV's output): q[T, nh, d] = its queries after RoPE (row t at
    # positions[t] of the tables cos/sin[S, d/2]) and the per-head QK-norm when q_norm.size; keys the same,
    # stored with the values into kv (a kernels.kv.KVBlocks) at position positions[t] of sequence slots[t] through
    # its block table (kernels.kv.store_kv: converted to the blocks' storage, int8 per token and head)
    T, nh, d = q.shape
    nkv = kv.k.shape[1]
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
    store_kv(kv, k, v, tables, slots, positions)
    return q


def route(ids, weights, x, router, norm, eps):
    # kernels.moe.route of rmsnorm(x) * norm (the MLP's input, normed as the router loads it): ids/weights[T k]
    # each row's k experts, best first, and their renormalised probabilities
    xn = rmsnorm(np.empty_like(x), x, norm, eps)
    return moe.route(ids, weights, np.empty(len(x) * len(router), np.float32), xn, router)


def _assignments(ex, ids, T):
    # the expert of each assignment t kk + j (j = k: the shared MLP, expert E)
    k = ex.topk
    e = np.full((T, k + ex.shared), ex.n_experts, np.int64)
    e[:, :k] = ids[:T * k].reshape(T, k)
    return e.reshape(-1)


def group_rows(order, tiles, ids, groups, kk):
    # order[T kk]: the assignments t kk + j sorted by expert (stable: ascending within an expert; j = k the shared
    # MLP, expert groups - 1); tiles[n, 3]: (expert, start, end) of each BM-row piece of each expert's run in order,
    # the rest zeros (empty)
    T = order.size // kk
    k = ids.size // T
    e = np.full((T, kk), groups - 1, np.int64)
    e[:, :k] = ids.reshape(T, k)
    e = e.reshape(-1)
    order[:] = np.argsort(e, kind="stable")
    tiles[:] = 0
    i, pos = 0, 0
    for g, c in enumerate(np.bincount(e, minlength=groups)):
        for lo in range(pos, pos + c, BM):
            tiles[i] = g, lo, min(lo + BM, pos + c)
            i += 1
        pos += c
    return order


def experts_up(h, x, ex, ids, norm, eps, scratch=None):
    # h[t kk + j] = silu(gate_e(xn[t])) * up_e(xn[t]) for e row t's j-th expert (j = k: the shared MLP when
    # ex.shared), xn = rmsnorm(x) * norm; only those experts' rows are read; scratch: the device's (unused here)
    T = len(x)
    xn = rmsnorm(np.empty_like(x), x, norm, eps)
    rows = shape(ex.gate_up)[0] // (ex.n_experts + ex.shared)
    for a, e in enumerate(_assignments(ex, ids, T)):
        y = dense(_rows(ex.gate_up, e * rows, rows)) @ xn[a // (ex.topk + ex.shared)]
        h[a] = y[0::2] / (1.0 + np.exp(-y[0::2])) * y[1::2]
    return h


def experts_down(out, h, ex, ids, weights, resid, scratch=None):
    # out[t] = resid[t] + sum_j w_tj down_e(h[t kk + j]), e row t's j-th expert, w its routing weight (1 for the
    # shared MLP), summed in order j; out may be resid
    T, H = out.shape
    kk = ex.topk + ex.shared
    acc = resid.astype(np.float32).copy()
    for a, e in enumerate(_assignments(ex, ids, T)):
        t, j = divmod(a, kk)
        w = weights[t * ex.topk + j] if j < ex.topk else np.float32(1.0)
        acc[t] += w * (dense(_rows(ex.down, e * H, H)) @ h[a])
    out[:] = acc
    return out


def _rows(w, lo, n):
    # rows lo..lo+n of a device linear of host arrays (one expert's)
    if isinstance(w, H16):
        return H16(w.w[lo:lo + n])
    return R4(w.words[lo:lo + n], w.scales[lo:lo + n], w.mins[lo:lo + n], w.sym, w.group)
