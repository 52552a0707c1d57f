"""NumPy references for fused ops that the faster backends provide (same signatures, for tests to swap)."""
import numpy as np

from .ref import rmsnorm


def add_rmsnorm(out_norm, resid, x, w, eps):
    # resid[T, n] += x[T, n] in place (the residual stream), then out_norm[T, n] = rmsnorm(resid) * w
    np.add(resid, x, out=resid)
    return rmsnorm(out_norm, resid, w, eps)
