"""Backends own memory and run the layers: they allocate the KV pool and the per-thread scratch, prepare the
weights, hold the RoPE tables, embed tokens and run a family's decoder layer and the lm_head. What each must
provide is written once, in contract.py; host.py holds the NumPy reference and the Numba backend, cuda.py and
cuda_memory.py the CUDA backend.

`select(name)` picks one by name: "numba" (the default), "numpy" (the references) or "cuda" (TINYHUN_KERNELS when no
name is given).
"""
import os

from ..errors import TinyhunError
from .contract import Backend, Scratch
from .host import NumbaBackend, NumpyBackend

BACKENDS = ("numba", "numpy", "cuda")

__all__ = ["BACKENDS", "Backend", "NumbaBackend", "NumpyBackend", "Scratch", "select"]


def select(name=None):
    """The backend named `name` (or by TINYHUN_KERNELS, else "numba"), created; "cuda" fails at once, with one
    line, where there is no GPU."""
    name = name or os.environ.get("TINYHUN_KERNELS") or "numba"
    if name not in BACKENDS:
        raise TinyhunError(f"kernels {name!r}: expected one of {', '.join(BACKENDS)} (TINYHUN_KERNELS)")
    if name == "cuda":
        from .cuda import CudaBackend   # loaded only when asked for
        return CudaBackend()
    return NumbaBackend() if name == "numba" else NumpyBackend()
