"""`linear` inside Numba code: the kernel for each weight format of tinyhun.kernels.linear, chosen at compile time
from the NamedTuple's class. A new format adds one entry to KERNELS."""
import numpy as np
from numba import njit, prange
from numba.core.errors import TypingError
from numba.extending import overload

from . import cpu_matmul, q4_cpu, q8_cpu
from .cpu_math import JIT, _n_chunks
from .cpu_matmul import BLAS_T, _matmul
from .linear import F32, LoRA, Q4, Q8, linear, rank_scratch


def _f32(out, x, w, acts):
    if x.shape[0] < BLAS_T:
        _matmul(out, x, w.w)
    else:
        np.dot(x, w.w.T, out)


def _q4(out, x, w, acts):
    if x.shape[0] == 1:
        q4_cpu._gemv(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales, w.mins, w.sym)
    elif x.shape[0] <= q4_cpu.FEW_T:
        q4_cpu._gemm_few(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales, w.mins, w.sym)
    else:
        q4_cpu._gemm(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales, w.mins, w.sym)


def _q8(out, x, w, acts):
    if x.shape[0] == 1:
        q8_cpu._gemv(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales)
    elif x.shape[0] <= q4_cpu.FEW_T:
        q8_cpu._gemm_few(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales)
    else:
        q8_cpu._gemm(out, x, acts.q, acts.d, acts.qsum, acts.xsum, w.packed, w.scales)


@njit(**JIT)
def _add_rank_rows(out, t, bt, lo, hi):
    for i in range(lo, hi):
        o, ti = out[i], t[i]
        for j in range(bt.shape[0]):
            s, b = ti[j], bt[j]
            for n in range(o.shape[0]):
                o[n] += s * b[n]


@njit(parallel=True, **JIT)
def _add_rank(out, t, bt):
    # out[T, N] += t[T, r] @ bt[r, N], threads split T
    T = out.shape[0]
    nc = _n_chunks(T, T * bt.size)
    if nc == 1:
        _add_rank_rows(out, t, bt, 0, T)
        return
    for c in prange(nc):
        _add_rank_rows(out, t, bt, c * T // nc, (c + 1) * T // nc)


def _lora(out, x, w, acts):
    # the base's kernel, then the side path in the activation scratch its quantized input no longer needs
    linear(out, x, w.base, acts)
    T, r = x.shape[0], w.a.shape[0]
    t = acts.q[:T * r * 4].view(np.float32).reshape((T, r))
    if T < BLAS_T:
        _matmul(t, x, w.a)
    else:
        np.dot(x, w.a.T, t)
    _add_rank(out, t, w.bt)


KERNELS = {F32: _f32, Q4: _q4, Q8: _q8, LoRA: _lora}


@overload(linear, jit_options=JIT)
def _linear_ov(out, x, w, acts):
    kernel = KERNELS.get(getattr(w, "instance_class", None))
    if kernel is None:
        raise TypingError(f"linear: no Numba kernel for weights of type {w}")
    return kernel


def _f32_py(out, x, w, acts):
    cpu_matmul.matmul(out, x, w.w)


def _q4_py(out, x, w, acts):
    q4_cpu._launch(q4_cpu.KERNELS, out, x, acts.view(*x.shape), w.packed, w.scales, w.mins, w.sym)


def _q8_py(out, x, w, acts):
    q8_cpu._launch(q8_cpu.KERNELS, out, x, acts.view(*x.shape), w.packed, w.scales)


def _lora_py(out, x, w, acts):
    matmul(out, x, w.base, acts)
    t = rank_scratch(acts, x.shape[0], w.a.shape[0])
    cpu_matmul.matmul(t, x, w.a)
    _add_rank(out, t, w.bt)


PYTHON = {F32: _f32_py, Q4: _q4_py, Q8: _q8_py, LoRA: _lora_py}


def matmul(out, x, w, acts):
    """`linear` called from Python on the Numba kernels (each kernel compiled only once a call needs it: a decode
    step never compiles the prefill GEMM)."""
    PYTHON[type(w)](out, x, w, acts)
    return out
