"""Numba's process-wide setup for tinyhun's kernels. Import it before any `@njit(cache=True)` kernel is defined.

Where compiled kernels live: Numba caches them (`cache=True`) in one folder per tinyhun build,
    $NUMBA_CACHE_DIR/tinyhun-<key>   when NUMBA_CACHE_DIR is set,
    $TINYHUN_HOME/numba/<key>        otherwise (TINYHUN_HOME defaults to ~/.cache/tinyhun).
`cache_dir()` returns the folder in use. To clear the cache delete that folder, or all of $TINYHUN_HOME/numba;
the next run compiles the kernels again. Folders of older builds are never read again and stay until deleted.

Why a key: Numba checks a cached kernel only against the file that defines it (its mtime and size up to numba
0.67, its bytes since 0.68) and its own version, not against the files of the kernels it calls and compiles into
itself, so after an upgrade a cached fused layer could run the machine code of its old callees. <key> hashes every
.py file of the `tinyhun` and `tinyhun.kernels` packages with the Python, numba, llvmlite and numpy versions and
the CPU name: any change gives a new, empty folder, and a cache written by another tinyhun is never trusted.

Why the thread pool starts here: a cached kernel records the hooks to run when it is loaded from the cache; a
`parallel=True` kernel's hook starts the thread pool (it binds the `numba_parallel_for` symbols). A kernel without
`parallel=True` that calls parallel ones inherits its callees' hooks only when they were compiled in the same
process, so a caller compiled while all its callees were cache hits is cached with none (Numba issues #8578,
#4807), and a later process calling it before any other parallel kernel jumps to address 0 (SIGSEGV). Starting
the pool at import makes every kernel, cached or not, find it running. It is what the first parallel kernel
would do anyway (~30 ms, mostly creating the lock that guards it; no thread starts before the first parallel
region under OpenMP), so a run pays nothing extra.

GOMP_SPINCOUNT: after a parallel region Numba's OpenMP threads busy-wait, by default long enough to starve
OpenBLAS's threads when a prefill matmul follows (2 cores: Numba GEMV + BLAS T=128 took 8.0-36 ms in sequence
against 2.7-3.0 ms apart). A spin of 3000 keeps the launch at ~2 µs for back-to-back kernels and the sequence at
the sum of its parts; OMP_WAIT_POLICY=passive would cost ~50 µs a launch. It must be set before the OpenMP
runtime loads (the thread pool's start, below) and yields to a value the user set. The other way round,
OpenBLAS's threads spinning after a call, is OPENBLAS_THREAD_TIMEOUT, set in tinyhun/__init__.py (it must come
before numpy loads OpenBLAS, which is before this module).
"""
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "3000")

import llvmlite
import numba
import numpy as np
from llvmlite import binding as llvm
from numba.core import config


def _package_dirs():
    # this package (tinyhun.kernels) and tinyhun, wherever they are installed; find_spec does not import tinyhun
    # (it is already imported as this package's parent, or it is looked up without running it)
    dirs = [Path(__file__).resolve().parent]
    spec = importlib.util.find_spec("tinyhun")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p).resolve() for p in spec.submodule_search_locations]
    return dirs


def source_key(dirs) -> str:
    """A hash of every .py file under `dirs` (relative name and bytes), the Python, numba, llvmlite and numpy
    versions and the CPU Numba compiles for."""
    h = hashlib.blake2b(digest_size=8)
    for part in (sys.version, numba.__version__, llvmlite.__version__, np.__version__,
                 config.CPU_NAME or llvm.get_host_cpu_name()):
        h.update(part.encode() + b"\0")
    files = {}
    for root in dirs:
        for f in Path(root).rglob("*.py"):
            files.setdefault(f.resolve(), f"{Path(root).name}/{f.relative_to(root).as_posix()}")
    for path, name in sorted(files.items(), key=lambda item: item[1]):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _cache_dir(key) -> Path:
    # Numba's compiler reloads its config whenever a NUMBA_ variable changed since the last reload, which would undo
    # the config.CACHE_DIR set below: a reload now takes in a NUMBA_CACHE_DIR set after numba was imported.
    config.reload_config()
    # The base from the environment, not from numba's config: once this module has run, config.CACHE_DIR is its
    # own versioned folder, and it runs twice in a process that also imports it as a top-level `kernels`
    # (transformers probes for Hugging Face's `kernels` package by importing it, and finds this folder when a
    # checkout's root is on sys.path). Read from config, the second run cached in tinyhun-<key>/tinyhun-<key>,
    # a folder no other process reads.
    base = os.environ.get("NUMBA_CACHE_DIR")
    if base:
        return Path(base).expanduser() / f"tinyhun-{key}"
    home = Path(os.environ.get("TINYHUN_HOME") or Path.home() / ".cache" / "tinyhun").expanduser()
    return home / "numba" / key


_CACHE_DIR = _cache_dir(source_key(_package_dirs()))
# Numba's UserProvidedCacheLocator reads config.CACHE_DIR when a cache=True kernel is decorated (it falls back to
# __pycache__ when the folder cannot be created); environment variables are left alone, so child processes start
# from what the user set and share this process's folder.
config.CACHE_DIR = str(_CACHE_DIR)
numba.get_num_threads()   # starts the thread pool (numba.np.ufunc.parallel._launch_threads)


def cache_dir() -> Path:
    """The folder Numba caches tinyhun's compiled kernels in (see this module's docstring)."""
    return _CACHE_DIR
