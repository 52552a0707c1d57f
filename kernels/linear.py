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
    """A frozen base linear plus a low-rank update: out = base(x) + (x @ a.T) @ bt, bt = scale * lora_B.T.

    The rank-r intermediate x @ a.T lives in the activation scratch (`rank_scratch`): the base matmul has finished
    with its int8 activations by then, and their bytes hold rows x width / 4 floats, room for r <= width / 4."""
    base: object         # F32, Q4 or Q8 [N, K]
    a: np.ndarray        # float32[r, K]  lora_A
    bt: np.ndarray       # float32[r, N]  scale * lora_B, transposed: the update is added N-wide, row by row

    @property
    def shape(self):
        return self.base.shape

    @property
    def nbytes(self):
        return self.base.nbytes + self.a.nbytes + self.bt.nbytes

    def matmul_ref(self, out, x, acts):
        linear(out, x, self.base, acts)
        t = rank_scratch(acts, x.shape[0], self.a.shape[0])
        np.matmul(x, self.a.T, out=t)
        out += t @ self.bt

    def rows(self, out, ids):
        raise TinyhunError("a LoRA linear is multiplied, never looked up by rows (embeddings are not adapted)")


def rank_scratch(acts, rows, r):
    """float32[rows, r] carved out of the int8 activations of act_scratch (see LoRA)."""
    return acts.q[:rows * r * 4].view(np.float32).reshape(rows, r)


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
    rows x width values (width a multiple of 32)."""
    n = rows * width
    return Q8Acts(np.zeros(n, np.int8), np.zeros(n // ACT_BLOCK, np.float32), np.zeros(n // ACT_BLOCK, np.int32),
                  np.zeros(n // ACT_BLOCK, np.float32))
