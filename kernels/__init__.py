"""tinyhun's compute kernels: ops only, one function per op, out-buffers passed in.

`ref` holds the NumPy references; `cpu` registers Numba kernels with the same names and signatures (called from
Python as `cpu.<op>`, and compiled in wherever Numba code calls `ref.<op>`); `linear` holds the weight formats
and their dispatch, `q4`/`q8` the INT4/INT8 layouts, quantizers and references. Nothing here imports the engine.
"""
from . import numba_env  # noqa: F401  (first: the versioned cache folder and the thread pool, before any kernel)
