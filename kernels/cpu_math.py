"""Shared pieces of the Numba CPU kernels: the fastmath flag set, a vectorizable fp32 exp, and how a reference op
compiles to its kernel inside Numba code (`compiles_to`).

Numba lowers `np.exp` on an fp32 scalar to a libm call per element (no SVML here), which made silu_mul 2x slower
than NumPy's SIMD exp. `exp_inplace` is the textbook scheme in two vectorizable loops: exp(x) = 2^n * p(r) with
n = round(x / ln2), r = x - n ln2 (ln2 split in two so r stays exact), p a degree-7 Taylor polynomial (error
< 1e-8 on |r| <= ln2/2), and 2^n added straight into the float's exponent bits through an int32 view.
"""
import inspect
import math
import types

import numpy as np
from numba import njit
from numba.extending import overload

# Reassociation is what lets reductions vectorize. No nnan/ninf: attention's running max starts at -inf.
FAST = {"reassoc", "contract", "nsz", "arcp"}
# error_model="numpy": Python's ZeroDivisionError check on every float division blocks vectorizing the loop
JIT = dict(cache=True, fastmath=FAST, error_model="numpy")

_LOG2E = np.float32(1.0 / math.log(2.0))
_LN2_HI = np.float32(0.693359375)          # 10 significant bits: n * _LN2_HI is exact for |n| < 2^14
_LN2_LO = np.float32(math.log(2.0) - 0.693359375)
_X_MIN = np.float32(-86.0)   # keeps 2^n a normal float: exp(-86) = 4e-38 stands in for anything smaller
_X_MAX = np.float32(88.0)    # exp(88) = 1.7e38 stands in for anything larger (silu only: g / huge -> 0)


# no reassoc here: it would fold the two-part ln2 back into one
@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def exp_inplace(x, n_scratch, count):
    # x[:count] = exp(x[:count]) in place; x fp32 contiguous, n_scratch int32[>= count]
    for i in range(count):
        v = min(max(x[i], _X_MIN), _X_MAX)
        n = np.floor(v * _LOG2E + np.float32(0.5))
        r = v - n * _LN2_HI - n * _LN2_LO
        p = np.float32(1.0 / 5040.0) * r + np.float32(1.0 / 720.0)
        p = p * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        x[i] = p * r + np.float32(1.0)
        n_scratch[i] = np.int32(n)
    bits = x.view(np.int32)
    for i in range(count):
        bits[i] += n_scratch[i] << 23


# Integer arguments of the kernels' serial paths: a bare 0 or 1 types as Literal[int](0) in Numba, which compiles
# the callee once more for that literal beside the int64 of its parallel path (seconds of a cold start)
ZERO, ONE = np.int64(0), np.int64(1)

CHUNK = 1 << 14  # elements per parallel chunk (~64 KB of fp32): below 2 chunks a kernel runs serially


@njit(**JIT)
def _n_chunks(units, size):
    return max(1, min(units, size // CHUNK))


@njit(inline="always", cache=True)   # typed in its caller: a constant unit would compile a copy per value
def _bounds(c, nc, n, unit):
    # chunk c of nc over 0..n-1 in whole units; the last chunk takes the remainder
    units = n // unit
    return c * units // nc * unit, (n if c == nc - 1 else (c + 1) * units // nc * unit)


def function_copy(fn, qualname=None, names=None):
    """A copy of the Python function fn for Numba to compile apart from fn: its own qualified name (Numba's cache
    files are named by it) and/or some of its globals rebound (names: name -> value)."""
    copy = types.FunctionType(fn.__code__, {**fn.__globals__, **(names or {})}, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__qualname__, copy.__module__ = qualname or fn.__qualname__, fn.__module__
    return copy


def compiles_to(ref_op, kernel):
    """Inside Numba code, `ref_op` becomes `kernel`'s own body (same argument names), not a call through a wrapper:
    Numba re-optimizes everything below a function at each level of calls, so a wrapper level per op made the
    cold compile of a layer several seconds longer.

    The body compiles with the kernel's options and is cached on disk, so a fused layer of another weight format
    (or a new process) loads the ops it shares with one compiled before instead of compiling them again. It is
    cached under a name of its own (`<kernel>.in_layer`): Numba keys a cached function by its bytecode and
    argument types only, and this body has no Python entry point, so sharing the kernel's entries would hand the
    kernel one without. The kernel must set `fastmath` (unset, Numba takes the caller's, and the two would differ)."""
    if "fastmath" not in kernel.targetoptions:
        raise TypeError(f"{kernel.py_func.__qualname__}: compiles_to needs a kernel that sets fastmath")
    body = function_copy(kernel.py_func, qualname=f"{kernel.py_func.__qualname__}.in_layer")

    def typer(*args):
        return body
    typer.__signature__ = inspect.signature(ref_op)
    options = {k: v for k, v in kernel.targetoptions.items() if k in ("parallel", "fastmath", "error_model")}
    overload(ref_op, jit_options={**options, "cache": True})(typer)
