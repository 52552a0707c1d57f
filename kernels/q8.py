"""INT8 weights (embeddings, lm_head): format, quantizer, GGUF Q8_0 import and NumPy reference matmul.

Format "q8_tiled16", layout version 1
-------------------------------------
llama.cpp's Q8_0 semantics: a weight W[N, K] (rows = output features) is cut along K into blocks of 32
(K % 32 == 0); each element has a code q in -128..127 (our quantizer writes -127..127, GGUF allows -128) and each
(row, block) one fp16 scale d:  w = q * d.
Rows are padded to a multiple of 16 (padding: q = 0, d = 0) and stored as row tiles of 16, as in q4_tiled16,
because the kernels keep 16 rows in the 16 int32/fp32 lanes of one AVX-512 register:
    packed  int8   [N_pad / 16, K / 4, 64]    packed[t, c, 4*r + j] = q[16*t + r, 4*c + j], r in 0..15, j in 0..3
    scales  float16[N_pad / 16, K / 32, 16]   scales[t, b, r] = d of row 16*t + r, block b
So one 64-byte chunk is 16 rows x 4 consecutive k, the operand shape of VPDPBUSD, and a 16 x 32 block is eight
chunks (512 bytes). The codes stay plain signed int8 (readable as they are by any other backend); VPDPBUSD
multiplies unsigned bytes, so the CPU kernel flips their sign bit (q + 128) and takes 128 * sum(xq) back off.

Kernel semantics: as matmul_q4 (see tinyhun.kernels.q4), x is rounded per block of 32 to int8 (`Q8Acts`), the
integer dot products are exact, and the result is exactly the rounded x times the dequantized weight:
    out[t, n] = sum over blocks b of d[n, b] * xd[t, b] * (q[n, b, :] . xq[t, b, :])
"""
from dataclasses import dataclass

import numpy as np

from .errors import TinyhunError

from . import q4
from .q4 import (ACT_BLOCK, TILE, _check_fields, _check_format, _f16, _float_matrix, _gather_rows, _gguf_blocks,
                 _gguf_f16, _pack_tiles, _round_codes, _row_chunks, _take_arrays, _tile_rows, _untile_rows,
                 quantize_acts)

FORMAT = "q8_tiled16"
LAYOUT_VERSION = 1
BLOCK = 32          # weight block along K = ACT_BLOCK, as in GGUF Q8_0


@dataclass
class Q8Weight:
    packed: np.ndarray   # int8[N_pad/16, K/4, 64]
    scales: np.ndarray   # float16[N_pad/16, K/32, 16]
    n: int
    k: int

    def __post_init__(self):
        # the kernels read raw memory at offsets computed from n and k: every shape must agree
        _check_shape(self.n, self.k)
        tiles = -(-self.n // TILE)
        fields = {"q8weight": (self.packed, np.int8, (tiles, self.k // 4, 64)),
                  "q8scales": (self.scales, np.float16, (tiles, self.k // BLOCK, TILE))}
        _check_fields("INT8", fields)

    @property
    def nbytes(self):
        """Bytes a matmul streams: codes + scales."""
        return self.packed.nbytes + self.scales.nbytes

    def to_arrays(self):
        """-> {"q8weight", "q8scales"}: store as <name>.q8weight etc., with `metadata()` beside them."""
        return {"q8weight": self.packed, "q8scales": self.scales}

    def metadata(self):
        return {"format": FORMAT, "version": LAYOUT_VERSION, "n": self.n, "k": self.k}

    @classmethod
    def from_arrays(cls, arrays, meta):
        """Inverse of to_arrays()/metadata() (e.g. after a JSON round trip); checks every field."""
        _check_format("INT8", meta, FORMAT, LAYOUT_VERSION)
        n, k = meta.get("n"), meta.get("k")
        if not (type(n) is int and type(k) is int):
            raise TinyhunError(f"INT8 weight metadata: expected integer n and k, got {meta}")
        return cls(*_take_arrays("INT8", arrays, ("q8weight", "q8scales")), n, k)


def _check_shape(n, k):
    if type(n) is not int or type(k) is not int or n < 1 or k < 1 or k % BLOCK:
        raise TinyhunError(f"INT8 weight [{n}, {k}]: expected N >= 1 and K a positive multiple of {BLOCK}")


def quantize_q8(w):
    """float[N, K] -> Q8Weight. d = max|w_block| / 127 rounded up to fp16, so rint(w / d) never leaves -127..127
    and |w - q * d| <= d/2 per element (plus fp32 rounding)."""
    w = _float_matrix(w, "quantize_q8", _check_shape)
    n, k = w.shape
    codes = np.empty((n, k), np.int8)
    scales = np.empty((n, k // BLOCK), np.float16)
    for rows, wb in _row_chunks(w, BLOCK):
        d = _f16(np.abs(wb).max(-1) / np.float32(127), up=True)
        codes[rows] = _round_codes(wb, d, "quantize_q8", 0, -127, 127).reshape(-1, k)
        scales[rows] = d
    return _pack(codes, scales)


def _pack(codes, scales):
    """codes int8[N, K], scales float16[N, K/32] -> Q8Weight in the tiled layout."""
    n, k = codes.shape
    packed = _pack_tiles(codes, np.int8, k // 4,
                         lambda c: c.reshape(-1, TILE, k // 4, 4).transpose(0, 2, 1, 3).reshape(-1, k // 4, 64))
    return Q8Weight(packed, _tile_rows(scales, len(packed)), n, k)


def unpack_q8(q):
    """Q8Weight -> (codes int8[N, K], scales float16[N, K/32])."""
    tiles = q.packed.shape[0]
    codes = q.packed.reshape(tiles, q.k // 4, TILE, 4).transpose(0, 2, 1, 3).reshape(tiles * TILE, q.k)[:q.n]
    return codes, _untile_rows(q.scales, q.n)


def _dequant(codes, scales):
    # codes int8[M, K], scales float16[M, K/32] -> float32[M, K]: q * d in fp32, as gguf's Q8_0 dequantization
    m, k = codes.shape
    w = codes.reshape(m, k // BLOCK, BLOCK).astype(np.float32) * scales.astype(np.float32)[..., None]
    return w.reshape(m, k)


def dequantize_q8(q):
    """Q8Weight -> float32[N, K]."""
    return _dequant(*unpack_q8(q))


def dequantize_rows(q, ids):
    """float32[len(ids), K]: rows `ids` of dequantize_q8(q), without unpacking the rest (an INT8 embedding)."""
    codes, s = _gather_rows(ids, q.n, q.packed, q.scales)   # codes [M, K/4, 4]
    return _dequant(codes.reshape(len(codes), q.k), s)


def from_gguf_q8_0(raw, n, k):
    """GGUF Q8_0 blocks (fp16 d, 32 int8 codes; w = q * d) -> Q8Weight, no requantization."""
    b = _gguf_blocks(raw, n, k, 2 + BLOCK, "Q8_0")
    return _pack(b[:, 2:].view(np.int8).reshape(n, k), _gguf_f16(b, 0, n, k))


def check_matmul(out, x, q):
    """Shape/dtype checks shared by the backends: x float32[T, K], out float32[T, N]."""
    if not isinstance(q, Q8Weight):
        raise TinyhunError(f"matmul_q8: expected a Q8Weight, got {type(q).__name__}")
    q4.check_matmul(out, x, q, "matmul_q8")


def matmul_q8(out, x, q, buf=None):
    """out[T, N] ~= x[T, K] @ dequantize_q8(q).T with x rounded to int8 per 32 into buf (a Q8Acts, made when
    None): sum over blocks b of d * xd_b * (codes . xq_b)."""
    check_matmul(out, x, q)
    acts = quantize_acts(x, buf)
    codes, s = unpack_q8(q)
    t, nb = acts.d.shape
    isum = np.einsum("tbk,nbk->tnb", acts.q.reshape(t, nb, ACT_BLOCK).astype(np.int32),
                     codes.reshape(q.n, nb, ACT_BLOCK).astype(np.int32))
    out[:] = np.einsum("tnb,tb,nb->tn", isum.astype(np.float32), acts.d, s.astype(np.float32))
    return out
