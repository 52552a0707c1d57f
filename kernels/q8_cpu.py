"""Numba CPU kernels for INT8 weights (format "q8_tiled16", see tinyhun.kernels.q8), on cpu_simd's vector intrinsics.

A 16-row x 4-k chunk of int8 codes is one VPDPBUSD operand. That instruction multiplies unsigned bytes by signed
ones, so each chunk is loaded with its sign bit flipped (q ^ 0x80 = q + 128 as u8, one XOR) and the block's
int32 sum starts at -128 * sum(xq) to take the offset back off: the result is the exact signed dot product.
Decode (T = 1) streams each tile once with its accumulator in a register, a few tokens (2..FEW_T) likewise with one
accumulator per token of a group of FEW_GROUP; prefill loads each 16 x 32 block of codes into registers once and
reuses it for every token of a pass.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .cpu_simd import U8, _check, _dot, _fma, _load64, _load_f, _load_h, _mul, _prefetch, _splat_f, _splat_i, _store_f
from .q4 import ACT_BLOCK, TILE
from .q4_cpu import FEW_GROUP, GEMM_TOKENS, PREFETCH, _dot32, _launch, _quantize_acts, _store_few, _store_tile
from .q8 import check_matmul

BLOCK_BYTES = ACT_BLOCK * TILE   # one 16-row x 32-k block of codes: 512 bytes, eight VPDPBUSD operands


@intrinsic
def _load_codes(typingctx, w, off):
    """64 int8 codes at w[off:] -> u8x64 holding q + 128."""
    _check(w, types.int8)

    def codegen(context, builder, sig, args):
        return builder.xor(_load64(context, builder, sig, args), ir.Constant(U8.llvm_type(), [0x80] * 64))
    return U8(w, off), codegen


@njit(cache=True, inline="always")
def _gemv_tile(tile, nb, xq, xd, xqsum, packed, scales):
    # one 16-row tile of a one-row product: its accumulator (also the MoE decode's expert tile, kernels/moe_cpu.py)
    acc = _splat_f(0.0)
    for b in range(nb):
        w0 = (tile * nb + b) * BLOCK_BYTES
        for c in range(8):
            _prefetch(packed, w0 + PREFETCH + 64 * c)
        isum = _splat_i(-128 * xqsum[b])
        for c in range(8):
            isum = _dot(isum, _load_codes(packed, w0 + 64 * c), xq, b * ACT_BLOCK + 4 * c)
        acc = _fma(acc, isum, _mul(_load_h(scales, (tile * nb + b) * TILE), _splat_f(xd[b])))
    return acc


@njit(cache=True, parallel=True)
def _gemv(out, x, xq, xd, xqsum, xsum, packed, scales):
    # out[1, N] = x[1, K] @ W[N, K].T; each tile's accumulator stays in a register
    _quantize_acts(x, xq, xd, xqsum, xsum)
    n, nb = out.shape[1], scales.shape[1]
    for tile in prange(packed.shape[0]):
        _store_tile(out, 0, n, tile, _gemv_tile(tile, nb, xq, xd, xqsum, packed, scales))


@njit(cache=True, parallel=True)
def _gemm(out, x, xq, xd, xqsum, xsum, packed, scales):
    # out[T, N] = x[T, K] @ W[N, K].T. Per pass of GEMM_TOKENS tokens (their int8 rows stay in L2), each tile's
    # 16 x 32 code blocks are loaded once into eight registers and serve every token; acc[tokens, 16] sits in L1
    _quantize_acts(x, xq, xd, xqsum, xsum)
    t_n, n = out.shape
    k, nb = x.shape[1], scales.shape[1]
    for t0 in range(0, t_n, GEMM_TOKENS):
        t1 = min(t0 + GEMM_TOKENS, t_n)
        for tile in prange(packed.shape[0]):
            acc = np.zeros((t1 - t0, TILE), np.float32)
            for b in range(nb):
                w0 = (tile * nb + b) * BLOCK_BYTES
                c0, c1 = _load_codes(packed, w0), _load_codes(packed, w0 + 64)
                c2, c3 = _load_codes(packed, w0 + 128), _load_codes(packed, w0 + 192)
                c4, c5 = _load_codes(packed, w0 + 256), _load_codes(packed, w0 + 320)
                c6, c7 = _load_codes(packed, w0 + 384), _load_codes(packed, w0 + 448)
                s = _load_h(scales, (tile * nb + b) * TILE)
                for t in range(t0, t1):
                    x0 = t * k + b * ACT_BLOCK
                    isum = _splat_i(-128 * xqsum[t * nb + b])
                    isum = _dot(_dot(isum, c0, xq, x0), c1, xq, x0 + 4)
                    isum = _dot(_dot(isum, c2, xq, x0 + 8), c3, xq, x0 + 12)
                    isum = _dot(_dot(isum, c4, xq, x0 + 16), c5, xq, x0 + 20)
                    isum = _dot(_dot(isum, c6, xq, x0 + 24), c7, xq, x0 + 28)
                    o = (t - t0) * TILE
                    _store_f(acc, o, _fma(_load_f(acc, o), isum, _mul(s, _splat_f(xd[t * nb + b]))))
            r0 = tile * TILE
            out[t0:t1, r0:r0 + TILE] = acc[:, :min(TILE, n - r0)]


@njit(cache=True, inline="always")
def _q8_token(acc, c, xq, xd, xqsum, i, x0, s):
    # acc + block i (= t nb + b) of token t against the loaded codes c; the same operations as _gemv and _gemm
    return _fma(acc, _dot32(_splat_i(-128 * xqsum[i]), c, xq, x0), _mul(s, _splat_f(xd[i])))


@njit(cache=True, parallel=True)
def _gemm_few(out, x, xq, xd, xqsum, xsum, packed, scales):
    # out[T, N] for 2 <= T <= FEW_T, as q4_cpu._gemm_few: per tile and group of FEW_GROUP tokens, one register
    # accumulator per token; the tile (K bytes) comes from memory for the first group and from L1 for the next
    _quantize_acts(x, xq, xd, xqsum, xsum)
    t_n, n = out.shape
    k, nb = x.shape[1], scales.shape[1]
    for tile in prange(packed.shape[0]):
        for t0 in range(0, t_n, FEW_GROUP):
            cnt = min(FEW_GROUP, t_n - t0)   # tokens in this group: a smaller last one costs less
            u0, u1, u2, u3 = t0, t0 + 1, t0 + 2, t0 + 3
            a0 = a1 = a2 = a3 = _splat_f(0.0)
            for b in range(nb):
                w0 = (tile * nb + b) * BLOCK_BYTES
                for c in range(8):
                    _prefetch(packed, w0 + PREFETCH + 64 * c)
                c = (_load_codes(packed, w0), _load_codes(packed, w0 + 64),
                     _load_codes(packed, w0 + 128), _load_codes(packed, w0 + 192),
                     _load_codes(packed, w0 + 256), _load_codes(packed, w0 + 320),
                     _load_codes(packed, w0 + 384), _load_codes(packed, w0 + 448))
                s = _load_h(scales, (tile * nb + b) * TILE)
                x0 = b * ACT_BLOCK
                a0 = _q8_token(a0, c, xq, xd, xqsum, u0 * nb + b, u0 * k + x0, s)
                if cnt > 1:
                    a1 = _q8_token(a1, c, xq, xd, xqsum, u1 * nb + b, u1 * k + x0, s)
                if cnt > 2:
                    a2 = _q8_token(a2, c, xq, xd, xqsum, u2 * nb + b, u2 * k + x0, s)
                if cnt > 3:
                    a3 = _q8_token(a3, c, xq, xd, xqsum, u3 * nb + b, u3 * k + x0, s)
            _store_few(out, t0, n, tile, a0, a1, a2, a3)


def matmul_q8(out, x, q, buf=None):
    """out[T, N] ~= x[T, K] @ dequantize_q8(q).T, x rounded to int8 per 32 along K into buf (a Q8Acts, made
    when None). Activation quantization runs inside the kernel: one Numba call per matmul."""
    check_matmul(out, x, q)
    return _launch(KERNELS, out, x, buf, q.packed, q.scales.view(np.uint16))


KERNELS = (_gemv, _gemm_few, _gemm)   # by T: 1, 2..FEW_T, more (see q4_cpu._launch)
