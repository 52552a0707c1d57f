"""The paged KV cache's layout and its NumPy reference ops.

Keys and values live in fixed-size blocks of BLOCK positions. One layer's blocks are a `KVBlocks`:
  k, v              [NB, nkv, BLOCK, d]  float32 (fp32), uint16 (fp16 bits: Numba has no float16 on the CPU) or int8
  k_scale, v_scale  [NB, nkv, BLOCK]     float32 of int8 storage (one scale per token and head, as llama.cpp's
                                          q8_0 KV types keep one per 32 values); shape (0, 0, 0) otherwise
A sequence is a block table: row `s` of `tables` (int32[n, max blocks]) lists its blocks in order, so position p
of sequence s is at block tables[s, p // BLOCK], offset p % BLOCK. A forward's row t belongs to sequence slots[t]
and sits at positions[t]; it attends to that sequence's positions 0..positions[t].

Every kernel reads stored keys and values through one conversion (`load` here; its Numba and CUDA twins sit in
their own modules): the layout is in this one file.
"""
from typing import NamedTuple

import numpy as np

BLOCK = 32   # positions per block: one block of keys is one pass of the attention kernel's score loop
KINDS = {"fp32": np.float32, "fp16": np.uint16, "int8": np.int8}   # --kv-dtype -> storage dtype
INT8_MAX = 127.0


class KVBlocks(NamedTuple):
    k: np.ndarray          # [NB, nkv, BLOCK, d] keys after RoPE (and QK-norm)
    v: np.ndarray          # [NB, nkv, BLOCK, d] values
    k_scale: np.ndarray    # [NB, nkv, BLOCK] int8 only; (0, 0, 0) otherwise
    v_scale: np.ndarray


def kind_of(kv):
    """The --kv-dtype name of a KVBlocks' storage."""
    return {np.dtype(t): n for n, t in KINDS.items()}[kv.k.dtype]


def encode(x, dtype):
    """fp32 rows x[..., d] -> (stored values, scales[...]) in `dtype`'s storage. int8: scale = max|x| / 127 per
    row, values rint(x / scale) (a zero row: scale 0, values 0); fp16: IEEE half, round to nearest even."""
    x = np.asarray(x, np.float32)
    if dtype == np.float32:
        return x.copy(), None
    if dtype == np.uint16:
        return x.astype(np.float16).view(np.uint16), None
    amax = np.abs(x).max(axis=-1)
    scale = (amax / np.float32(INT8_MAX)).astype(np.float32)
    inv = np.divide(np.float32(1.0), scale, out=np.zeros_like(scale), where=scale > 0)
    return np.rint(x * inv[..., None]).astype(np.int8), scale


def load(stored, scale):
    """Stored rows [..., d] (with their scales [...] for int8) -> fp32."""
    if stored.dtype == np.float32:
        return stored
    if stored.dtype == np.uint16:
        return stored.view(np.float16).astype(np.float32)
    return stored.astype(np.float32) * scale[..., None]


def allocate(zeros, layers, blocks, nkv, d, kind):
    """One KVBlocks per layer, each a view of one [layers, blocks, ...] array per field; zeros(shape, dtype) is the
    backend's allocator (untouched memory stays unbacked until a block is written)."""
    dtype = KINDS[kind]
    k, v = zeros((layers, blocks, nkv, BLOCK, d), dtype), zeros((layers, blocks, nkv, BLOCK, d), dtype)
    sshape = (layers, blocks, nkv, BLOCK) if kind == "int8" else (layers, 0, 0, 0)
    ks, vs = zeros(sshape, np.float32), zeros(sshape, np.float32)
    return tuple(KVBlocks(k[i], v[i], ks[i], vs[i]) for i in range(layers))


def gather(kv, table, n):
    """fp32 keys and values [nkv, n, d] of a sequence's first n positions (block table `table`)."""
    bs = kv.k.shape[2]
    nb = -(-n // bs)
    blocks = np.asarray(table[:nb], np.int64)

    def rows(x, s):
        scale = s[blocks] if s.size else None
        y = load(x[blocks], scale)                          # [nb, nkv, BLOCK, d]
        return y.transpose(1, 0, 2, 3).reshape(x.shape[1], nb * bs, -1)[:, :n]
    return rows(kv.k, kv.k_scale), rows(kv.v, kv.v_scale)


def store_kv(kv, k, v, tables, slots, positions):
    # kv: KVBlocks of one layer; row t's k, v[T, nkv, d] (fp32) go to position positions[t] of sequence slots[t]
    # (block tables[slots[t], p // bs], offset p % bs; bs = kv.k.shape[2], BLOCK in the engine), converted to the
    # blocks' storage
    bs = kv.k.shape[2]
    for t in range(k.shape[0]):
        p = positions[t]
        b, o = tables[slots[t], p // bs], p % bs
        for src, dst, sc in ((k[t], kv.k, kv.k_scale), (v[t], kv.v, kv.v_scale)):
            val, scale = encode(src, dst.dtype)
            dst[b, :, o] = val
            if scale is not None:
                sc[b, :, o] = scale
    return kv


def attention_rows(out, q, kv, tables, slots, positions):
    # out[T, nh, d]: row t's queries q[t] attend causally (GQA, softmax(q k^T / sqrt(d)) v) to positions
    # 0..positions[t] of sequence slots[t]; kv already holds them. Rows are independent: a prefill chunk is T rows
    # of one sequence at consecutive positions, a batch decode step one row per sequence.
    T, nh, d = q.shape
    nkv = kv.k.shape[1]
    group = nh // nkv
    scale = np.float32(1.0 / np.sqrt(d))
    for t in range(T):
        kc, vc = gather(kv, tables[slots[t]], positions[t] + 1)   # [nkv, n, d]
        qt = q[t].reshape(nkv, group, d)
        s = (qt @ kc.transpose(0, 2, 1)) * scale                   # [nkv, group, n]
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out[t] = (p @ vc).reshape(nh, d)
    return out
