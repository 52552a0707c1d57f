"""Linear layers as the kernels take them: one NamedTuple per weight format, chosen once at load time.

A checkpoint matrix becomes F32, Q4 or Q8 (`as_linear`), and every op that applies a weight, `linear(out, x, w,
acts)`, is dispatched on that type: here in Python to the NumPy reference, in tinyhun.kernels.cpu at compile time
to the Numba kernel (a Numba NamedTuple's type is its class). A new kind of linear is a new class here with its
entries beside these, not an edit of the callers: LoRA wraps any of the others with a low-rank side path. Fields
are plain arrays and numbers, so Numba takes them as they are and a device backend can hold the same fields in
device arrays.
"""
from typing import NamedTuple

import numpy as np

from . import q4, q8
from .errors import TinyhunError
from .q4 import ACT_BLOCK, Q4Weight, Q8Acts
from .q8 import Q8Weight


class F32(NamedTuple):
    w: np.ndarray        # float32[N, K], C-contiguous (memory-mapped when the checkpoint is fp32)

    @property
    def shape(self):
        return self.w.shape

    @property
    def nbytes(self):
        return self.w.nbytes

    def matmul_ref(self, out, x, acts):
        np.matmul(x, self.w.T, out=out)

    def rows(self, out, ids):
        np.take(self.w, ids, axis=0, out=out)


class Q4(NamedTuple):
    packed: np.ndarray   # uint8[N_pad/16, K/8, 64]   (layout: kernels/q4.py)
    scales: np.ndarray   # uint16[N_pad/16, K/G, 16]  fp16 bits (Numba has no fp16 arrays)
    mins: np.ndarray     # uint16[N_pad/16, K/G, 16]  fp16 bits; the scales again when symmetric (never read then)
    sym: bool
    n: int               # N, rows before padding

    @property
    def shape(self):
        return self.n, self.packed.shape[1] * 8

    @property
    def nbytes(self):
        return self.packed.nbytes + self.scales.nbytes * (1 if self.sym else 2)

    def weight(self):
        """The Q4Weight (format object) these fields view, without copying."""
        k = self.packed.shape[1] * 8
        return Q4Weight(self.packed, self.scales.view(np.float16), None if self.sym else self.mins.view(np.float16),
                        self.n, k, k // self.scales.shape[1])

    def matmul_ref(self, out, x, acts):
        q4.matmul_q4(out, x, self.weight(), acts.view(*x.shape))

    def rows(self, out, ids):
        out[:] = q4.dequantize_rows(self.weight(), ids)


class Q8(NamedTuple):
    packed: np.ndarray   # int8[N_pad/16, K/4, 64]   (layout: kernels/q8.py)
    scales: np.ndarray   # uint16[N_pad/16, K/32, 16] fp16 bits
    n: int

    @property
    def shape(self):
        return self.n, self.packed.shape[1] * 4

    @property
    def nbytes(self):
        return self.packed.nbytes + self.scales.nbytes

    def weight(self):
        return Q8Weight(self.packed, self.scales.view(np.float16), self.n, self.packed.shape[1] * 4)

    def matmul_ref(self, out, x, acts):
        q8.matmul_q8(out, x, self.weight(), acts.view(*x.shape))

    def rows(self, out, ids):
        out[:] = q8.dequantize_rows(self.weight(), ids)


class LoRA(NamedTuple):
    """A frozen base linear plus a low-rank update: out = base(x) + scale * (x @ A.T) @ B.T.

    A and B are float32, or fp16 bits (uint16) beside a quantized base, where they are most of what the side path
    costs a decoded token: the kernels widen them in registers (`side_path` makes either). B is kept in the base's
    16-row tiles so a one-row product adds each tile's update to the tile's own accumulator (kernels/cpu_linear.py).
    The rank-r intermediate scale * x @ A.T lives in act_scratch's rank half (`rank_scratch`)."""
    base: object         # F32, Q4 or Q8 [N, K], K a multiple of 16
    a: np.ndarray        # float32 or fp16 bits [r, K]: lora_A
    b: np.ndarray        # float32 or fp16 bits [ceil(N/16), r, 16]: lora_B's rows in tiles of 16, zeros past N
    scale: float         # lora_alpha / r times the powers of two A and B were divided by (fp16's range)

    @property
    def shape(self):
        return self.base.shape

    @property
    def nbytes(self):
        return self.base.nbytes + self.a.nbytes + self.b.nbytes

    def matmul_ref(self, out, x, acts):
        linear(out, x, self.base, acts)
        t = rank_scratch(acts, x.shape[0], self.a.shape[0])
        np.matmul(x, _floats(self.a).T, out=t)
        t *= np.float32(self.scale)
        out += t @ lora_b(self).T

    def rows(self, out, ids):
        raise TinyhunError("a LoRA linear is multiplied, never looked up by rows (embeddings are not adapted)")


def side_path(base, a, b, scale, half):
    """LoRA from lora_A [r, K], lora_B [N, r] and their scale: stored as fp16 when `half` (each divided by a power
    of two that brings its largest entry to [0.5, 1), exact, so fp16 keeps 11 bits of every entry down to 6e-5 of
    that largest; the powers go into scale), else float32."""
    n, k = base.shape
    if k % 16:
        raise TinyhunError(f"a LoRA side path needs in-features that are a multiple of 16, got {k}")
    scale, mats = float(scale), []
    for m in (np.asarray(a, np.float32), np.asarray(b, np.float32)):
        if half:
            p = np.float32(2.0 ** np.frexp(np.abs(m).max())[1]) if m.any() else np.float32(1.0)
            m, scale = (m / p).astype(np.float16).view(np.uint16), scale * float(p)
        mats.append(m)
    a, b = mats
    r = a.shape[0]
    tiles = np.zeros((-(-n // 16) * 16, r), b.dtype)
    tiles[:n] = b
    return LoRA(base, np.ascontiguousarray(a), np.ascontiguousarray(tiles.reshape(-1, 16, r).transpose(0, 2, 1)),
                scale)


def lora_b(w):
    """float32 [N, r]: a LoRA's B as stored, untiled (without its scale)."""
    b = _floats(w.b)
    return b.transpose(0, 2, 1).reshape(-1, b.shape[1])[:w.shape[0]]


def _floats(m):
    return m.view(np.float16).astype(np.float32) if m.dtype == np.uint16 else m


def rank_scratch(acts, rows, r):
    """float32[rows, r] in the upper half of act_scratch's int8 activations (see act_scratch)."""
    half = acts.q.size // 2
    return acts.q[half:half + rows * r * 4].view(np.float32).reshape(rows, r)


def as_linear(w):
    """A checkpoint matrix (float array, Q4Weight or Q8Weight) -> its linear type. The one place formats are told
    apart."""
    if isinstance(w, Q4Weight):
        scales = w.scales.view(np.uint16)
        return Q4(w.packed, scales, scales if w.sym else w.mins.view(np.uint16), w.sym, w.n)
    if isinstance(w, Q8Weight):
        return Q8(w.packed, w.scales.view(np.uint16), w.n)
    if isinstance(w, np.ndarray) and w.ndim == 2 and np.issubdtype(w.dtype, np.floating):
        return F32(np.ascontiguousarray(w, dtype=np.float32))
    raise TinyhunError(f"a weight matrix must be a 2-D float array, a Q4Weight or a Q8Weight, got {type(w).__name__}")


def linear(out, x, w, acts):
    # out[T, N] = x[T, K] @ W[N, K].T for any linear type w; acts: flat int8 activation scratch (act_scratch) that
    # the quantized formats round x into. NumPy reference; kernels.cpu_linear registers the Numba kernels.
    w.matmul_ref(out, x, acts)


def act_scratch(rows, width):
    """Flat int8 activation scratch (a Q8Acts of 1-D arrays, as the kernels take it) for any matmul input of up to
    rows x width values (width a multiple of 32). q holds twice that: its upper half is a LoRA's rank scratch
    (rank_scratch: rows x width / 4 floats, room for r <= width / 4), filled before the base rounds x into the lower."""
    n = rows * width
    return Q8Acts(np.zeros(2 * n, np.int8), np.zeros(n // ACT_BLOCK, np.float32), np.zeros(n // ACT_BLOCK, np.int32),
                  np.zeros(n // ACT_BLOCK, np.float32))
