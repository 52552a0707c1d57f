"""tinyhun's compute kernels: one op per function, out-buffers passed in, the same signature in every backend.

`tinyhun.kernels.ref` holds the NumPy references; faster backends (Numba CPU, numba.cuda) expose the same names.
`select()` returns the backend a model should use; TINYHUN_KERNELS=numpy forces the references.
"""
import os

from . import ref

BACKENDS = ("numpy", "numba")


def select(name=None):
    name = name or os.environ.get("TINYHUN_KERNELS", "numba")
    if name not in BACKENDS:
        raise ValueError(f"TINYHUN_KERNELS={name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "numpy":
        return ref
    from . import cpu
    return cpu
