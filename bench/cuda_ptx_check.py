"""Compile every CUDA kernel variant the backend launches to PTX (sm_90) with the GPU code path (warp shuffles),
on a machine without a GPU: catches what the simulator cannot (typing the CUDA compiler refuses).

Needs NVRTC/NVVM beside numba-cuda: `pip install nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12`. Run
`python bench/cuda_ptx_check.py`; it prints one line per kernel and the count.
"""
import itertools

import numba
import numba.cuda.dispatcher
import numpy as np
from numba import cuda

from tinyhun.kernels import cuda_attention, cuda_common, cuda_linear, cuda_moe, cuda_ref, moe, q4
from tinyhun.kernels.linear import as_linear


class _H100:
    compute_capability = (9, 0)


def main():
    assert cuda_common.SHUFFLE, "run without NUMBA_ENABLE_CUDASIM"
    numba.cuda.dispatcher.get_current_device = _H100   # device functions ask for the current device's cc
    done = set()

    def compile_launch(kern, grid, block, *args):
        sig = tuple(numba.typeof(a) for a in args)
        if (kern, sig) not in done:
            done.add((kern, sig))
            ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
            print(f"ok {kern.py_func.__name__} grid {grid} block {block}: {len(ptx)} chars of PTX")
    cuda_linear.launch = cuda_attention.launch = cuda_moe.launch = compile_launch
    cuda_linear.no_routing = cuda_moe.no_routing = lambda: (np.zeros((1, 3), np.int64), np.zeros(1, np.float32))
    cuda_linear.no_side = lambda: (np.zeros((1, 1), np.float16), np.zeros(1, np.int32), np.zeros(1, np.float32),
                                   np.zeros((1, 1), np.float32))
    f32 = np.float32
    N, K = 64, 128
    w = np.random.default_rng(0).standard_normal((N, K)).astype(f32)
    for lin, T in itertools.product([w, q4.quantize_q4(w, 32), q4.quantize_q4(w, 64, False)], (1, 6)):
        dw = cuda_ref.device_format(as_linear(lin))
        x, nw, r = np.zeros((T, K), f32), np.ones(K, f32), np.zeros((T, N), f32)
        cuda_linear.linear(np.zeros((T, N), f32), x, dw)
        cuda_linear.linear(np.zeros((T, N), f32), x, dw, norm=nw, eps=1e-5)
        cuda_linear.linear(np.zeros((T, N), f32), x, dw, resid=r)
        cuda_linear.linear(np.zeros((T, N // 2), f32), x, dw, norm=nw, eps=1e-5, pairs=True)
        cuda_linear.embed_rows(np.zeros((T, K), f32), dw, np.zeros(T, np.int64))
        cuda_linear.argmax_rows(np.zeros(T, np.int64), np.zeros((T, N), f32))
    side_variants(f32)
    wide = cuda_ref.device_format(as_linear(np.zeros((cuda_linear.WIDE, K), f32)))   # several rows per warp
    cuda_linear.linear(np.zeros((1, cuda_linear.WIDE), f32), np.zeros((1, K), f32), wide, norm=np.ones(K, f32))
    attention_variants(f32)
    moe_variants(f32)
    print(f"{len(done)} kernels compiled to PTX for sm_90")


def attention_variants(f32):
    """RoPE + KV store and attention over the paged cache in each storage type (on the device fp16 is float16),
    with QK-norm and without, decode and prefill rows, one split and several with their merge."""
    from tinyhun.kernels import kv
    nh, nkv, d, NB, bs = 16, 8, 128, 8, kv.BLOCK
    dtypes = {"fp32": f32, "fp16": np.float16, "int8": np.int8}
    for (T, norm), kind in itertools.product(((1, True), (5, False)), dtypes):
        scales = (NB, nkv, bs) if kind == "int8" else (0, 0, 0)
        blocks = kv.KVBlocks(*(np.zeros((NB, nkv, bs, d), dtypes[kind]) for _ in range(2)),
                             *(np.zeros(scales, f32) for _ in range(2)))
        idx, tables, cos = np.zeros(T, np.int64), np.zeros((2, 4), np.int32), np.zeros((4 * bs, d // 2), f32)
        n = np.ones(d, f32) if norm else np.zeros(0, f32)
        cuda_attention.rope_qk_store(np.zeros((T, nh, d), f32), np.zeros((T, (nh + 2 * nkv) * d), f32), blocks,
                                     cos, cos, tables, idx, idx, n, n, 1e-5)
        for split in (256, 16):   # sequences of 4 blocks: one split, or 8 and the merge
            cuda_attention.attention_rows(np.zeros((T, nh, d), f32), np.zeros((T, nh, d), f32), blocks, tables,
                                          idx, idx, split=split, partials=np.zeros(T * nh * 8 * (d + 2), f32))


def side_variants(f32):
    """A LoRA side path (cuda_ref.Adapted) on INT4 bases, symmetric and not, GEMV and GEMM, with each epilogue."""
    from tinyhun.kernels.linear import side_path
    N, K, r = 64, 128, 4
    rng = np.random.default_rng(2)
    for quant, T in itertools.product([(32, True), (64, False)], (1, 6)):
        w = rng.standard_normal((N, K)).astype(f32)
        lin = side_path(as_linear(q4.quantize_q4(w, *quant)), rng.standard_normal((r, K)),
                        rng.standard_normal((N, r)), 0.5, True)
        dw = cuda_ref.device_format(lin)
        x, nw, side = np.zeros((T, K), f32), np.ones(K, f32), np.zeros(T * K, f32)
        cuda_linear.linear(np.zeros((T, N), f32), x, dw, norm=nw, eps=1e-5, side=side)
        cuda_linear.linear(np.zeros((T, N), f32), x, dw, resid=np.zeros((T, N), f32), side=side)
        cuda_linear.linear(np.zeros((T, N // 2), f32), x, dw, norm=nw, eps=1e-5, pairs=True, side=side)


def moe_variants(f32):
    """The router, the grouping sort and combine, the experts' GEMVs (decode) and grouped GEMMs (prefill) in each
    device format, with the shared MLP stacked and without."""
    from tinyhun.structs import DenseMLP
    E, k, H, Ie = 8, 2, 128, 64
    rng = np.random.default_rng(1)
    for quant, shared in itertools.product([None, (32, True), (64, False)], (False, True)):
        def lin(n, kd):
            w = rng.standard_normal((n, kd)).astype(f32)
            return as_linear(w if quant is None else q4.quantize_q4(w, *quant))
        gate, up, down = (moe.stack_linears([lin(n, kd) for _ in range(E)]) for n, kd in ((Ie, H), (Ie, H), (H, Ie)))
        ex, _ = cuda_ref.experts_of(gate, up, down, k, DenseMLP(lin(Ie, H), lin(Ie, H), lin(H, Ie)) if shared else None)
        kk = k + ex.shared
        for T in (1, 6):
            sc = cuda_moe.MoEScratch(_HostArrays, T, H, k, kk, Ie, E + ex.shared)
            ids, weights, x = np.zeros(T * k, np.int64), np.zeros(T * k, f32), np.zeros((T, H), f32)
            cuda_moe.route(ids, weights, x, np.zeros((E, H), f32), np.ones(H, f32), 1e-5)
            h = np.zeros((T * kk, Ie), f32)
            cuda_moe.experts_up(h, x, ex, ids, np.ones(H, f32), 1e-5, sc)
            cuda_moe.experts_down(x, h, ex, ids, weights, x, sc)


class _HostArrays:
    """numba.cuda's allocators as host arrays: the PTX check only types the arguments."""
    device_array = staticmethod(np.zeros)


if __name__ == "__main__":
    main()
