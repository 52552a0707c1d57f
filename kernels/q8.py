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

from tinyhun.errors import TinyhunError

from .q4 import _CHUNK_TILES, ACT_BLOCK, TILE, _f16, _gguf_blocks, quantize_acts

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
        for name, (a, dtype, shape) in fields.items():
            if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous):
                got = f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
                raise TinyhunError(f"INT8 weight field {name!r}: expected C-contiguous {np.dtype(dtype)}"
                                   f"{list(shape)}, got {got}")

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
        if meta.get("format") != FORMAT or meta.get("version") != LAYOUT_VERSION:
            raise TinyhunError(f"INT8 weight metadata: expected format {FORMAT!r} version {LAYOUT_VERSION}, "
                               f"got {meta.get('format')!r} version {meta.get('version')!r}")
        n, k = meta.get("n"), meta.get("k")
        if not (type(n) is int and type(k) is int):
            raise TinyhunError(f"INT8 weight metadata: expected integer n and k, got {meta}")
        missing = [name for name in ("q8weight", "q8scales") if name not in arrays]
        if missing:
            raise TinyhunError(f"INT8 weight: arrays {missing} missing")
        return cls(np.ascontiguousarray(arrays["q8weight"]), np.ascontiguousarray(arrays["q8scales"]), n, k)


def _check_shape(n, k):
    if type(n) is not int or type(k) is not int or n < 1 or k < 1 or k % BLOCK:
        raise TinyhunError(f"INT8 weight [{n}, {k}]: expected N >= 1 and K a positive multiple of {BLOCK}")


def quantize_q8(w):
    """float[N, K] -> Q8Weight. d = max|w_block| / 127 rounded up to fp16, so rint(w / d) never leaves -127..127
    and |w - q * d| <= d/2 per element (plus fp32 rounding)."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise TinyhunError(f"quantize_q8: expected a 2-D float array, got {w.dtype}{list(w.shape)}")
    n, k = w.shape
    _check_shape(n, k)
    if not np.isfinite(w).all():
        raise TinyhunError("quantize_q8: weight holds inf or nan")
    codes = np.empty((n, k), np.int8)
    scales = np.empty((n, k // BLOCK), np.float16)
    rows = _CHUNK_TILES * TILE
    for r0 in range(0, n, rows):
        wb = w[r0:r0 + rows].astype(np.float32).reshape(-1, k // BLOCK, BLOCK)
        d = _f16(np.abs(wb).max(-1) / np.float32(127), up=True)
        if not np.isfinite(d).all():
            raise TinyhunError("quantize_q8: weights too large for fp16 scales")
        df = d.astype(np.float32)[..., None]
        inv = np.divide(1, df, out=np.zeros_like(df), where=df > 0)
        codes[r0:r0 + rows] = np.clip(np.rint(wb * inv), -127, 127).reshape(-1, k)
        scales[r0:r0 + rows] = d
    return _pack(codes, scales)


def _pack(codes, scales):
    """codes int8[N, K], scales float16[N, K/32] -> Q8Weight in the tiled layout."""
    n, k = codes.shape
    tiles = -(-n // TILE)
    packed = np.empty((tiles, k // 4, 64), np.int8)
    for t0 in range(0, tiles, _CHUNK_TILES):
        c = codes[t0 * TILE:(t0 + _CHUNK_TILES) * TILE]
        c = np.pad(c, ((0, -len(c) % TILE), (0, 0)))
        packed[t0:t0 + _CHUNK_TILES] = c.reshape(-1, TILE, k // 4, 4).transpose(0, 2, 1, 3).reshape(-1, k // 4, 64)
    s = np.pad(scales, ((0, tiles * TILE - n), (0, 0))).reshape(tiles, TILE, -1).transpose(0, 2, 1)
    return Q8Weight(packed, np.ascontiguousarray(s), n, k)


def unpack_q8(q):
    """Q8Weight -> (codes int8[N, K], scales float16[N, K/32])."""
    tiles = q.packed.shape[0]
    codes = q.packed.reshape(tiles, q.k // 4, TILE, 4).transpose(0, 2, 1, 3).reshape(tiles * TILE, q.k)[:q.n]
    return codes, q.scales.transpose(0, 2, 1).reshape(tiles * TILE, -1)[:q.n]


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
    ids = np.asarray(ids).reshape(-1)
    if ids.size and not (np.issubdtype(ids.dtype, np.integer) and 0 <= ids.min() and ids.max() < q.n):
        raise TinyhunError(f"dequantize_rows: expected integer row ids in 0..{q.n - 1}, got {ids.dtype} {ids[:8]}")
    ids, i = ids.astype(np.intp), np.arange(len(ids))
    t, r = ids // TILE, ids % TILE
    codes = q.packed[t].reshape(len(ids), q.k // 4, TILE, 4)[i, :, r].reshape(len(ids), q.k)
    return _dequant(codes, q.scales[t, :, r])


def from_gguf_q8_0(raw, n, k):
    """GGUF Q8_0 blocks (fp16 d, 32 int8 codes; w = q * d) -> Q8Weight, no requantization."""
    b = _gguf_blocks(raw, n, k, 2 + BLOCK, "Q8_0")
    d = b[:, :2].copy().view(np.float16).reshape(n, k // BLOCK)
    return _pack(b[:, 2:].view(np.int8).reshape(n, k), d)


def check_matmul(out, x, q):
    """Shape/dtype checks shared by the backends: x float32[T, K], out float32[T, N]."""
    if not isinstance(q, Q8Weight):
        raise TinyhunError(f"matmul_q8: expected a Q8Weight, got {type(q).__name__}")
    if x.ndim != 2 or x.shape[1] != q.k or out.shape != (x.shape[0], q.n):
        raise TinyhunError(f"matmul_q8: x{list(x.shape)} @ W[{q.n}, {q.k}].T -> out{list(out.shape)}: shapes differ")
    if x.dtype != np.float32 or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise TinyhunError(f"matmul_q8: expected float32 x and C-contiguous float32 out, "
                           f"got {x.dtype} and {out.dtype}")


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
