"""INT4 weights: the one format every tinyhun INT4 kernel reads, its quantizer, GGUF import and NumPy reference.

Format "q4_tiled16", layout version 1
-------------------------------------
A weight W[N, K] (rows = output features) is cut along K into groups of G = 32, 64 or 128 (K % G == 0).
Each element has a code q in 0..15 and each (row, group) one fp16 scale, plus one fp16 min when asymmetric:
    symmetric:   w = (q - 8) * scale
    asymmetric:  w = q * scale + min
Rows are padded to a multiple of 16 (padding: q = 0, scale = min = 0, so w = 0) and stored as row tiles of 16,
because the kernels keep 16 rows in the 16 int32/fp32 lanes of one AVX-512 register:
    packed  uint8  [N_pad / 16, K / 8, 64]   byte packed[t, c, 4*r + j], r in 0..15, j in 0..3, holds
                                                 low nibble  q[16*t + r, 8*c + j]
                                                 high nibble q[16*t + r, 8*c + 4 + j]
    scales  float16[N_pad / 16, K / G, 16]   scales[t, g, r] of row 16*t + r, group g
    mins    float16[N_pad / 16, K / G, 16]   asymmetric only (None when symmetric)
So one 64-byte chunk is 16 rows x 8 consecutive k, and each nibble half gives every row four consecutive k in
one 32-bit lane: the operand shape of VPDPBUSD (u8 x s8, four adjacent products summed into an int32 lane).
A tile streams through memory front to back; its scales are a second stream, 8x smaller at G = 32.

Kernel semantics (int8 activations, as llama.cpp's Q4_0 x Q8_0)
--------------------------------------------------------------
matmul_q4(out, x, q) computes out[T, N] ~= x[T, K] @ dequantize_q4(q).T with x rounded per block of 32 along K
to int8 (`Q8Acts`): xq = rint(x * (127 / max|x_block|)), d = max|x_block| / 127, x ~= xq * d. The integer dot
products are exact; the only error beyond fp32 rounding is the activation rounding, |x - xq*d| <= d/2 per element,
weighted by the weight itself (the asymmetric min term multiplies the block sum of the rounded x, as llama.cpp's
Q8_1 does, so the result is exactly the rounded x times the dequantized weight).
This module holds the NumPy reference of `quantize_acts` and `matmul_q4`; tinyhun.kernels.q4_cpu has the Numba
ones, whose activation rounding is bit-identical.
"""
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import TinyhunError

FORMAT = "q4_tiled16"
LAYOUT_VERSION = 1
TILE = 16          # rows per tile = fp32 lanes of one AVX-512 register
ACT_BLOCK = 32     # activation quantization block along K
GROUPS = (32, 64, 128)
_CHUNK_TILES = 256  # quantize/pack this many tiles at a time to bound temporary memory


@dataclass
class Q4Weight:
    packed: np.ndarray        # uint8[N_pad/16, K/8, 64]
    scales: np.ndarray        # float16[N_pad/16, K/G, 16]
    mins: np.ndarray | None   # float16[N_pad/16, K/G, 16] or None (symmetric)
    n: int
    k: int
    group: int

    def __post_init__(self):
        # the kernels read raw memory at offsets computed from n, k and group: every shape must agree
        _check_shape(self.n, self.k, self.group)
        tiles = -(-self.n // TILE)
        fields = {"qweight": (self.packed, np.uint8, (tiles, self.k // 8, 64)),
                  "scales": (self.scales, np.float16, (tiles, self.k // self.group, TILE))}
        if self.mins is not None:
            fields["mins"] = (self.mins, np.float16, fields["scales"][2])
        _check_fields("INT4", fields)

    @property
    def sym(self):
        return self.mins is None

    @property
    def nbytes(self):
        """Bytes a matmul streams: packed codes + scales (+ mins)."""
        return self.packed.nbytes + self.scales.nbytes + (0 if self.sym else self.mins.nbytes)

    def to_arrays(self):
        """-> {"qweight", "scales"[, "mins"]}: store as <name>.qweight etc., with `metadata()` beside them."""
        arrays = {"qweight": self.packed, "scales": self.scales}
        if not self.sym:
            arrays["mins"] = self.mins
        return arrays

    def metadata(self):
        return {"format": FORMAT, "version": LAYOUT_VERSION, "n": self.n, "k": self.k,
                "group": self.group, "sym": self.sym}

    @classmethod
    def from_arrays(cls, arrays, meta):
        """Inverse of to_arrays()/metadata() (e.g. after a JSON round trip); checks every field."""
        _check_format("INT4", meta, FORMAT, LAYOUT_VERSION)
        n, k, group, sym = (meta.get(f) for f in ("n", "k", "group", "sym"))
        if not (all(type(v) is int for v in (n, k, group)) and type(sym) is bool):
            raise TinyhunError(f"INT4 weight metadata: expected integer n, k, group and boolean sym, got {meta}")
        a = _take_arrays("INT4", arrays, ("qweight", "scales") if sym else ("qweight", "scales", "mins"))
        return cls(a[0], a[1], None if sym else a[2], n, k, group)


# ---- helpers shared with the INT8 format (tinyhun.kernels.q8), whose tiles have the same rows and padding ----

def _check_fields(kind, fields):
    """fields {name: (array, dtype, shape)}: the kernels read raw memory, so each must be exactly that."""
    for name, (a, dtype, shape) in fields.items():
        if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous):
            got = f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
            raise TinyhunError(f"{kind} weight field {name!r}: expected C-contiguous {np.dtype(dtype)}"
                               f"{list(shape)}, got {got}")


def _check_format(kind, meta, fmt, version):
    if meta.get("format") != fmt or meta.get("version") != version:
        raise TinyhunError(f"{kind} weight metadata: expected format {fmt!r} version {version}, "
                           f"got {meta.get('format')!r} version {meta.get('version')!r}")


def _take_arrays(kind, arrays, names):
    """[C-contiguous arrays[name] for name in names], naming every missing one."""
    missing = [name for name in names if name not in arrays]
    if missing:
        raise TinyhunError(f"{kind} weight: arrays {missing} missing")
    return [np.ascontiguousarray(arrays[name]) for name in names]


def _float_matrix(w, name, check_shape):
    """w as a finite 2-D float array, check_shape(n, k) run before the (full-array) finiteness test."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise TinyhunError(f"{name}: expected a 2-D float array, got {w.dtype}{list(w.shape)}")
    check_shape(*w.shape)
    if not np.isfinite(w).all():
        raise TinyhunError(f"{name}: weight holds inf or nan")
    return w


def _row_chunks(w, block):
    """(rows, float32[m, K/block, block] of w[rows]) over chunks of _CHUNK_TILES tiles, to bound temporaries."""
    rows = _CHUNK_TILES * TILE
    for r0 in range(0, len(w), rows):
        yield slice(r0, r0 + rows), w[r0:r0 + rows].astype(np.float32).reshape(-1, w.shape[1] // block, block)


def _round_codes(wb, s, name, base, lo, hi):
    """clip(rint(wb / s) + base, lo, hi) per block of wb[..., block] with scales s[...] (code `base` where s = 0)."""
    if not np.isfinite(s).all():
        raise TinyhunError(f"{name}: weights too large for fp16 scales")
    sf = s.astype(np.float32)[..., None]
    inv = np.divide(1, sf, out=np.zeros_like(sf), where=sf > 0)
    q = np.rint(wb * inv)
    if base:
        q += base
    return np.clip(q, lo, hi)


def _pack_tiles(codes, dtype, chunks, arrange):
    """codes[N, K] -> dtype[N_pad/16, chunks, 64]: rows padded with zeros to whole tiles, arrange(c) lays out
    c[m*16, K] (m whole tiles) as [m, chunks, 64]; _CHUNK_TILES tiles at a time."""
    tiles = -(-len(codes) // TILE)
    packed = np.empty((tiles, chunks, 64), dtype)
    for t0 in range(0, tiles, _CHUNK_TILES):
        c = codes[t0 * TILE:(t0 + _CHUNK_TILES) * TILE]
        packed[t0:t0 + _CHUNK_TILES] = arrange(np.pad(c, ((0, -len(c) % TILE), (0, 0))))
    return packed


def _tile_rows(a, tiles):
    """[N, B] (or None) -> [tiles, B, 16], rows padded with zeros (zero scales and mins: zero weights)."""
    if a is None:
        return None
    return np.ascontiguousarray(np.pad(a, ((0, tiles * TILE - len(a)), (0, 0))).reshape(tiles, TILE, -1)
                                .transpose(0, 2, 1))


def _untile_rows(a, n):
    """Inverse of _tile_rows: [tiles, B, 16] (or None) -> [n, B]."""
    return None if a is None else a.transpose(0, 2, 1).reshape(-1, a.shape[1])[:n]


def _gather_rows(ids, n, packed, *fields):
    """Rows `ids` (integers in 0..n-1) of a tiled weight: packed [tiles, C, 64] -> [M, C, 4] (row r's bytes of each
    chunk) and each field [tiles, B, 16] (or None) -> [M, B]."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and not (np.issubdtype(ids.dtype, np.integer) and 0 <= ids.min() and ids.max() < n):
        raise TinyhunError(f"dequantize_rows: expected integer row ids in 0..{n - 1}, got {ids.dtype} {ids[:8]}")
    ids = ids.astype(np.intp)
    i, t, r = np.arange(len(ids)), ids // TILE, ids % TILE
    b = packed[t].reshape(len(ids), packed.shape[1], TILE, 4)[i, :, r]
    return (b, *(None if f is None else f[t, :, r] for f in fields))


def _check_shape(n, k, group):
    if group not in GROUPS:
        raise TinyhunError(f"INT4 group size {group}: expected one of {GROUPS}")
    if n < 1 or k < 1 or k % group:
        raise TinyhunError(f"INT4 weight [{n}, {k}]: K must be a positive multiple of the group size {group}")


def _f16(v, up):
    """Round fp32 to the fp16 at or above (up=True) / at or below v, so clipping never widens the error bound."""
    h = v.astype(np.float16)
    off = h.astype(np.float32) < v if up else h.astype(np.float32) > v
    h[off] = np.nextafter(h[off], np.float16(np.inf if up else -np.inf))
    return h


def quantize_q4(w, group=32, sym=True):
    """float[N, K] -> Q4Weight. Round to nearest with no clipping, so |w - dequant| <= scale/2 per element
    (plus fp32 rounding): sym uses scale = max(max(w)/7, -min(w)/8), asym scale = (max - min)/15."""
    w = _float_matrix(w, "quantize_q4", lambda n, k: _check_shape(n, k, group))
    n, k = w.shape
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, k // group), np.float16)
    mins = None if sym else np.empty_like(scales)
    for rows, wg in _row_chunks(w, group):
        lo, hi = wg.min(-1), wg.max(-1)
        if sym:
            s = _f16(np.maximum(np.maximum(hi, 0) / 7, np.maximum(-lo, 0) / 8), up=True)
            base = 8
        else:
            m = _f16(lo, up=False)
            s = _f16((hi - m.astype(np.float32)) / 15, up=True)
            wg = wg - m.astype(np.float32)[..., None]
            mins[rows] = m
            base = 0
        codes[rows] = _round_codes(wg, s, "quantize_q4", base, 0, 15).reshape(-1, k)
        scales[rows] = s
    return _pack(codes, scales, mins, group)


def _pack(codes, scales, mins, group):
    """codes uint8[N, K] in 0..15, scales/mins float16[N, K/G] -> Q4Weight in the tiled layout."""
    n, k = codes.shape

    def arrange(c):
        c = c.reshape(-1, TILE, k // 8, 2, 4).transpose(0, 2, 1, 4, 3)   # [t, c, r, j, nibble]
        return (c[..., 0] | (c[..., 1] << 4)).reshape(-1, k // 8, 64)
    packed = _pack_tiles(codes, np.uint8, k // 8, arrange)
    return Q4Weight(packed, _tile_rows(scales, len(packed)), _tile_rows(mins, len(packed)), n, k, group)


def _nibbles(b):
    # bytes [..., 4] (packed[t, c, 4*r:4*r+4]) -> codes [..., 2, 4]: k = 8c + j, then 8c + 4 + j
    return np.stack([b & 15, b >> 4], axis=-2)


def _dequant(codes, s, m, group):
    # codes [M, K] (any integer layout reshaping to it), s/m float16[M, K/G] -> float32[M, K], in gguf's fp32 ops
    c = codes.reshape(len(s), -1, group).astype(np.float32)
    sf = s.astype(np.float32)[..., None]
    w = sf * (c - 8) if m is None else sf * c + m.astype(np.float32)[..., None]
    return w.reshape(len(s), -1)


def unpack_q4(q):
    """Q4Weight -> (codes uint8[N, K], scales float16[N, K/G], mins float16[N, K/G] or None)."""
    tiles = q.packed.shape[0]
    codes = _nibbles(q.packed.reshape(tiles, q.k // 8, TILE, 4))          # [t, c, r, nibble, j]
    codes = codes.transpose(0, 2, 1, 3, 4).reshape(tiles * TILE, q.k)[:q.n]
    return codes, _untile_rows(q.scales, q.n), _untile_rows(q.mins, q.n)


def dequantize_q4(q):
    """Q4Weight -> float32[N, K]; the same fp32 operations as gguf's Q4_0/Q4_1 dequantization."""
    return _dequant(*unpack_q4(q), q.group)


def _gguf_blocks(raw, n, k, block_bytes, name):
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or k % 32 or n < 1 or raw.size != n * (k // 32) * block_bytes:
        raise TinyhunError(f"{name} tensor: expected uint8 blocks of {block_bytes} bytes for [{n}, {k}] "
                           f"(K a multiple of 32), got {raw.dtype} of {raw.size} bytes")
    return raw.reshape(n * (k // 32), block_bytes)


def _gguf_f16(b, col, n, k):
    """The fp16 field at byte `col` of every GGUF block row of b -> float16[N, K/32]."""
    return b[:, col:col + 2].copy().view(np.float16).reshape(n, k // 32)


def _gguf_codes(qs, n, k):
    # GGUF block: byte j holds element j (low nibble) and element j + 16 (high nibble)
    return np.concatenate([qs & 15, qs >> 4], axis=1).reshape(n, k)


def from_gguf_q4_0(raw, n, k):
    """GGUF Q4_0 blocks (fp16 d, 16 bytes of nibbles; w = (q - 8) * d) -> symmetric group 32, no requantization."""
    b = _gguf_blocks(raw, n, k, 18, "Q4_0")
    return _pack(_gguf_codes(b[:, 2:], n, k), _gguf_f16(b, 0, n, k), None, 32)


def from_gguf_q4_1(raw, n, k):
    """GGUF Q4_1 blocks (fp16 d, fp16 m, 16 bytes; w = q * d + m) -> asymmetric group 32, no requantization."""
    b = _gguf_blocks(raw, n, k, 20, "Q4_1")
    return _pack(_gguf_codes(b[:, 4:], n, k), _gguf_f16(b, 0, n, k), _gguf_f16(b, 2, n, k), 32)


class Q8Acts(NamedTuple):
    """Activations rounded to int8 per block of 32 along K: x ~= q * d."""
    q: np.ndarray      # int8[T, K]
    d: np.ndarray      # float32[T, K/32]
    qsum: np.ndarray   # int32[T, K/32]  sum of q per block: folds the -8 of symmetric codes into one term
    xsum: np.ndarray   # float32[T, K/32] d * qsum, the sum of the rounded x per block: multiplies asymmetric mins.
    # Not the exact sum of x: with it the rounding error would meet q * scale (0..15 scales) instead of the weight
    # itself, and SmolLM2's Q4_1 perplexity rose 2.2 % instead of (measured after the change) below 1 %.

    @classmethod
    def empty(cls, t, k):
        """A buffer for up to t*k activations; `view` carves any smaller [T, K] out of it without copying."""
        nb = -(-k // ACT_BLOCK)
        return cls(np.empty((t, k), np.int8), np.empty((t, nb), np.float32),
                   np.empty((t, nb), np.int32), np.empty((t, nb), np.float32))

    def view(self, t, k):
        if self.q.shape == (t, k):
            return self
        if t * k > self.q.size or t * (k // ACT_BLOCK) > self.d.size:
            raise TinyhunError(f"activation buffer of {self.q.size} values is too small for [{t}, {k}]")
        nb = k // ACT_BLOCK
        return Q8Acts(*(a.reshape(-1)[:t * m].reshape(t, m) for a, m in zip(self, (k, nb, nb, nb))))


def check_matmul(out, x, q, name="matmul_q4"):
    """Shape/dtype checks shared by the backends (and the INT8 ones): x float32[T, K], out float32[T, N]."""
    if x.ndim != 2 or x.shape[1] != q.k or out.shape != (x.shape[0], q.n):
        raise TinyhunError(f"{name}: x{list(x.shape)} @ W[{q.n}, {q.k}].T -> out{list(out.shape)}: shapes differ")
    if x.dtype != np.float32 or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise TinyhunError(f"{name}: expected float32 x and C-contiguous float32 out, "
                           f"got {x.dtype} and {out.dtype}")


def _acts_buffer(buf, t, k):
    """buf viewed as Q8Acts for [t, k], or a new one when buf is None."""
    return (buf if buf is not None else Q8Acts.empty(t, k)).view(t, k)


def check_acts(x):
    if x.ndim != 2 or x.dtype != np.float32 or x.shape[1] % ACT_BLOCK:
        raise TinyhunError(f"quantize_acts: expected float32[T, K] with K a multiple of {ACT_BLOCK}, "
                           f"got {x.dtype}{list(x.shape)}")


def quantize_acts(x, buf=None):
    """float32[T, K] -> Q8Acts (written into buf's memory when given): d = max|x|/127, q = rint(x * (127/max|x|)),
    per block of 32 along K."""
    check_acts(x)
    t, k = x.shape
    a = _acts_buffer(buf, t, k)
    xb = x.reshape(t, k // ACT_BLOCK, ACT_BLOCK)
    amax = np.abs(xb).max(-1).astype(np.float64)      # quotients in float64, rounded once, as the kernel does
    inv = np.divide(127.0, amax, out=np.zeros_like(amax), where=amax > 0).astype(np.float32)
    q = np.rint(xb * inv[..., None])
    a.q[:] = q.reshape(t, k)
    a.d[:] = (amax / 127.0).astype(np.float32)
    a.qsum[:] = q.sum(-1)
    a.xsum[:] = a.d * a.qsum.astype(np.float32)
    return a


def matmul_q4(out, x, q, buf=None):
    """out[T, N] ~= x[T, K] @ dequantize_q4(q).T with x rounded to int8 per 32 into buf (module docstring):
    sum over blocks b of scale * d_b * (codes . xq_b - 8 * qsum_b if sym) (+ min * xsum_b if asym)."""
    check_matmul(out, x, q)
    acts = quantize_acts(x, buf)
    codes, s, m = unpack_q4(q)
    t, nb = acts.d.shape
    per = q.group // ACT_BLOCK
    isum = np.einsum("tbk,nbk->tnb", acts.q.reshape(t, nb, ACT_BLOCK).astype(np.int32),
                     codes.reshape(q.n, nb, ACT_BLOCK).astype(np.int32))
    if q.sym:
        isum -= 8 * acts.qsum[:, None, :]
    sb = np.repeat(s.astype(np.float32), per, axis=1)                      # [N, nb]
    out[:] = np.einsum("tnb,tb,nb->tn", isum.astype(np.float32), acts.d, sb)
    if not q.sym:
        out += acts.xsum @ np.repeat(m.astype(np.float32), per, axis=1).T
    return out


def dequantize_rows(q, ids):
    """float32 [len(ids), K]: rows `ids` of dequantize_q4(q), without unpacking the rest (an INT4 embedding)."""
    b, s, m = _gather_rows(ids, q.n, q.packed, q.scales, q.mins)   # b [M, K/8, 4]
    return _dequant(_nibbles(b), s, m, q.group)
