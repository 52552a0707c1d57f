"""Applying a token bitmask (llguidance's layout: int32 words, bit j of word w allows token 32*w + j) to one row of
logits in place: a disallowed token's logit becomes -inf. Tokens past the mask's bits are disallowed.

Constrained rows are sampled on the host (tinyhun's sampler is NumPy), so only a CPU version exists. The NumPy
reference unpacks every bit (~0.3 ms for a 49k vocabulary, most of it the boolean scatter); the Numba kernel skips
the words that allow all 32 tokens (a JSON string's body allows nearly every token) and touches only the
disallowed ones elsewhere.
"""
import numpy as np
from numba import njit

from . import numba_env  # noqa: F401  (the versioned cache folder, before a kernel is defined)
from .cpu_math import JIT


def apply_token_mask_ref(logits, mask):
    """logits float32[V] (in place), mask int32[W]."""
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:logits.shape[0]].astype(bool)
    logits[:bits.shape[0]][~bits] = -np.inf
    logits[bits.shape[0]:] = -np.inf


@njit(**JIT)
def _apply(logits, mask):
    v = logits.shape[0]
    neg = np.float32(-np.inf)
    for w in range(mask.shape[0]):
        word = mask[w]
        if word == -1:
            continue
        base = w * 32
        for j in range(32):
            t = base + j
            if t >= v:
                return
            if (word >> j) & 1 == 0:
                logits[t] = neg
    for t in range(mask.shape[0] * 32, v):
        logits[t] = neg


def apply_token_mask(logits, mask):
    """The Numba version of apply_token_mask_ref (same arguments, same result)."""
    _apply(logits, mask)
