"""Numba INT4 kernels: `quantize_acts` and `matmul_q4` with the signatures and semantics of
tinyhun.kernels.q4 (layout and rounding described there), on the vector intrinsics of kernels/cpu_simd.py.

Decode (T = 1) streams each tile once with its accumulator in a register; a few tokens (2..FEW_T, batched decode)
do the same with one register accumulator per token of a group of FEW_GROUP; prefill unpacks each 16 x 32 block of
codes once and reuses it for every token.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .cpu_simd import (U8, _check, _dot, _fma, _lane, _load64, _load_f, _load_h, _mul, _prefetch, _reduce_f,
                       _round_store, _splat_f, _splat_i, _store_f)
from .q4 import ACT_BLOCK, TILE, _acts_buffer, check_acts, check_matmul

# Decode prefetches the codes this many bytes ahead: hardware prefetch alone keeps too few misses in flight
# (one thread: ~10.5 GB/s without, ~14 with; 2-4 KB measured alike, 4 KB a little better with two threads).
PREFETCH = 4096
GEMM_TOKENS = 128   # prefill tokens per pass over the weight (their int8 activations: 128 x K bytes, in L2)
FEW_T = 8           # up to this many tokens take the register-accumulator kernel (_gemm_few)
FEW_GROUP = 4       # tokens per pass over a tile in _gemm_few (its a0..a3): with eight code registers, well in 32 zmm


@intrinsic
def _unpack(typingctx, w, off):
    """64 bytes at w[off:] -> (low nibbles, high nibbles) as u8x64."""
    _check(w, types.uint8)

    def codegen(context, builder, sig, args):
        v, vty = _load64(context, builder, sig, args), U8.llvm_type()
        mask = ir.Constant(vty, [15] * 64)
        hi = builder.and_(builder.lshr(v, ir.Constant(vty, [4] * 64)), mask)
        return context.make_tuple(builder, sig.return_type, [builder.and_(v, mask), hi])
    return types.UniTuple(U8, 2)(w, off), codegen


# ---- activations -------------------------------------------------------------------------------------------

@njit(cache=True)
def _quantize_acts(x, q, d, qsum, xsum):
    # x[T, K] -> q int8[T K], d/qsum/xsum[T K/32], flat (row t's blocks at t K/32..); a block of 32 is two f32x16
    # registers
    k = x.shape[1]
    nb = k // ACT_BLOCK
    for t in range(x.shape[0]):
        for b in range(nb):
            o = t * k + b * ACT_BLOCK
            v0, v1 = _load_f(x, o), _load_f(x, o + 16)
            amax = max(_reduce_f(v0, True), _reduce_f(v1, True))
            # in float64, then rounded: LLVM may turn a float32 division into a multiply by the reciprocal (it did
            # in a clean build), which is 1 ulp off; the rounded float64 quotient matches NumPy's either way
            inv = np.float32(127.0 / np.float64(amax)) if amax > 0 else np.float32(0.0)
            i = t * nb + b
            d[i] = np.float32(np.float64(amax) / 127.0)
            qsum[i] = _round_store(q, o, v0, inv) + _round_store(q, o + 16, v1, inv)
            xsum[i] = d[i] * np.float32(qsum[i])


def quantize_acts(x, buf=None):
    """float32[T, K] -> Q8Acts, written into buf's memory when given (see q4.quantize_acts)."""
    check_acts(x)
    a = _acts_buffer(buf, *x.shape)
    _quantize_acts(np.ascontiguousarray(x), *_flat(a))
    return a


def _flat(acts):
    """The kernels take activation buffers flat: [T, K] -> [T K] views."""
    return tuple(f.reshape(-1) for f in acts)


# ---- weights x activations ---------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _block_dot(init, packed, w0, xq, x0):
    # i32x16: init + codes of one 16-row x 32-k block (256 bytes at packed[w0:]) . xq[x0:x0+32]
    acc = _splat_i(init)
    for c in range(4):
        lo, hi = _unpack(packed, w0 + 64 * c)
        acc = _dot(acc, lo, xq, x0 + 8 * c)
        acc = _dot(acc, hi, xq, x0 + 8 * c + 4)
    return acc


@njit(cache=True, inline="always")
def _dot32(isum, c, xq, x0):
    # isum + the eight 16-row x 4-k chunks c (k order) . xq[x0:x0+32]
    isum = _dot(_dot(isum, c[0], xq, x0), c[1], xq, x0 + 4)
    isum = _dot(_dot(isum, c[2], xq, x0 + 8), c[3], xq, x0 + 12)
    isum = _dot(_dot(isum, c[4], xq, x0 + 16), c[5], xq, x0 + 20)
    return _dot(_dot(isum, c[6], xq, x0 + 24), c[7], xq, x0 + 28)


@njit(cache=True, inline="always")
def _store_tile(out, t, n, tile, acc):
    # out[t, 16*tile:16*tile+16] = acc's lanes (fewer in a last, partial tile of n rows)
    r0 = tile * TILE
    if r0 + TILE <= n:
        _store_f(out, t * n + r0, acc)
    else:
        for r in range(n - r0):
            out[t, r0 + r] = _lane(acc, r)


@njit(cache=True, inline="always")
def _store_few(out, t0, n, tile, a0, a1, a2, a3):
    t_n = out.shape[0]
    _store_tile(out, t0, n, tile, a0)
    if t0 + 1 < t_n:
        _store_tile(out, t0 + 1, n, tile, a1)
    if t0 + 2 < t_n:
        _store_tile(out, t0 + 2, n, tile, a2)
    if t0 + 3 < t_n:
        _store_tile(out, t0 + 3, n, tile, a3)


@njit(cache=True, inline="always")
def _gemv_tile(tile, nb, ng, per, xq, xd, xqsum, xsum, packed, scales, mins, sym):
    # one 16-row tile of a one-row product: its accumulator (also the MoE decode's expert tile, kernels/moe_cpu.py)
    acc = _splat_f(0.0)
    for g in range(ng):
        so = (tile * ng + g) * TILE
        s = _load_h(scales, so)
        for b in range(g * per, (g + 1) * per):
            w0 = (tile * nb + b) * 256
            for c in range(4):
                _prefetch(packed, w0 + PREFETCH + 64 * c)
            isum = _block_dot(-8 * xqsum[b] if sym else 0, packed, w0, xq, b * ACT_BLOCK)
            acc = _fma(acc, isum, _mul(s, _splat_f(xd[b])))
            if not sym:
                acc = _fma(acc, _load_h(mins, so), _splat_f(xsum[b]))
    return acc


@njit(cache=True, parallel=True)
def _gemv(out, x, xq, xd, xqsum, xsum, packed, scales, mins, sym):
    # out[1, N] = x[1, K] @ W[N, K].T; each tile's accumulator stays in a register
    _quantize_acts(x, xq, xd, xqsum, xsum)
    n, k = out.shape[1], x.shape[1]
    nb, ng = k // ACT_BLOCK, scales.shape[1]
    per = nb // ng
    for tile in prange(packed.shape[0]):
        _store_tile(out, 0, n, tile, _gemv_tile(tile, nb, ng, per, xq, xd, xqsum, xsum, packed, scales, mins, sym))


@njit(cache=True, inline="always")
def _unpack_block(packed, w0):
    # the codes of one 16-row x 32-k block (256 bytes at packed[w0:]) as the eight chunks _dot32 takes
    lo0, hi0 = _unpack(packed, w0)
    lo1, hi1 = _unpack(packed, w0 + 64)
    lo2, hi2 = _unpack(packed, w0 + 128)
    lo3, hi3 = _unpack(packed, w0 + 192)
    return lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3


@njit(cache=True, inline="always")
def _q4_token(acc, c, xq, xd, xqsum, xsum, i, x0, s, m, sym):
    # acc + block i (= t nb + b) of token t against the unpacked codes c (_gemm, _gemm_few): _gemv_tile's operations
    isum = _dot32(_splat_i(-8 * xqsum[i] if sym else 0), c, xq, x0)
    acc = _fma(acc, isum, _mul(s, _splat_f(xd[i])))
    if not sym:
        acc = _fma(acc, m, _splat_f(xsum[i]))
    return acc


@njit(cache=True, parallel=True)
def _gemm(out, x, xq, xd, xqsum, xsum, packed, scales, mins, sym):
    # out[T, N] = x[T, K] @ W[N, K].T. Per pass of GEMM_TOKENS tokens (their int8 rows stay in L2), each tile's
    # 16 x 32 code blocks are unpacked once and serve every token; acc[tokens, 16] sits in L1
    _quantize_acts(x, xq, xd, xqsum, xsum)
    t_n, n = out.shape
    k = x.shape[1]
    nb, ng = k // ACT_BLOCK, scales.shape[1]
    per = nb // ng
    for t0 in range(0, t_n, GEMM_TOKENS):
        t1 = min(t0 + GEMM_TOKENS, t_n)
        for tile in prange(packed.shape[0]):
            acc = np.zeros((t1 - t0, TILE), np.float32)
            for g in range(ng):
                so = (tile * ng + g) * TILE
                s = _load_h(scales, so)
                m = s if sym else _load_h(mins, so)
                for b in range(g * per, (g + 1) * per):
                    c = _unpack_block(packed, (tile * nb + b) * 256)
                    for t in range(t0, t1):
                        o = (t - t0) * TILE
                        _store_f(acc, o, _q4_token(_load_f(acc, o), c, xq, xd, xqsum, xsum, t * nb + b,
                                                   t * k + b * ACT_BLOCK, s, m, sym))
            r0 = tile * TILE
            out[t0:t1, r0:r0 + TILE] = acc[:, :min(TILE, n - r0)]


@njit(cache=True, parallel=True)
def _gemm_few(out, x, xq, xd, xqsum, xsum, packed, scales, mins, sym):
    # out[T, N] for 2 <= T <= FEW_T: per tile and group of (up to) FEW_GROUP tokens, one register accumulator per token
    # and each 16 x 32 code block unpacked once for the group. The tile (K/2 bytes) comes from memory for the
    # first group and from L1 for the next; no scratch, so a small T costs about what the GEMV does
    _quantize_acts(x, xq, xd, xqsum, xsum)
    t_n, n = out.shape
    k = x.shape[1]
    nb, ng = k // ACT_BLOCK, scales.shape[1]
    per = nb // ng
    for tile in prange(packed.shape[0]):
        for t0 in range(0, t_n, FEW_GROUP):
            cnt = min(FEW_GROUP, t_n - t0)   # tokens in this group: a smaller last one costs less
            u0, u1, u2, u3 = t0, t0 + 1, t0 + 2, t0 + 3
            a0 = a1 = a2 = a3 = _splat_f(0.0)
            for g in range(ng):
                so = (tile * ng + g) * TILE
                s = _load_h(scales, so)
                m = s if sym else _load_h(mins, so)
                for b in range(g * per, (g + 1) * per):
                    w0 = (tile * nb + b) * 256
                    for c in range(4):
                        _prefetch(packed, w0 + PREFETCH + 64 * c)
                    c = _unpack_block(packed, w0)
                    x0 = b * ACT_BLOCK
                    a0 = _q4_token(a0, c, xq, xd, xqsum, xsum, u0 * nb + b, u0 * k + x0, s, m, sym)
                    if cnt > 1:
                        a1 = _q4_token(a1, c, xq, xd, xqsum, xsum, u1 * nb + b, u1 * k + x0, s, m, sym)
                    if cnt > 2:
                        a2 = _q4_token(a2, c, xq, xd, xqsum, xsum, u2 * nb + b, u2 * k + x0, s, m, sym)
                    if cnt > 3:
                        a3 = _q4_token(a3, c, xq, xd, xqsum, xsum, u3 * nb + b, u3 * k + x0, s, m, sym)
            _store_few(out, t0, n, tile, a0, a1, a2, a3)


def matmul_q4(out, x, q, buf=None):
    """out[T, N] ~= x[T, K] @ dequantize_q4(q).T, x rounded to int8 per 32 along K into buf (a Q8Acts, made
    when None). Activation quantization runs inside the kernel: one Numba call per matmul."""
    check_matmul(out, x, q)
    scales = q.scales.view(np.uint16)
    mins = scales if q.sym else q.mins.view(np.uint16)   # never read when symmetric
    return _launch(KERNELS, out, x, buf, q.packed, scales, mins, q.sym)


KERNELS = (_gemv, _gemm_few, _gemm)   # by T: 1, 2..FEW_T, more (see _launch)


def _launch(kernels, out, x, buf, *weight):
    """kernels = (gemv, gemm_few, gemm), the one for x's T run as kernel(out, x, *activation buffer arrays,
    *weight): the activation buffer is buf viewed for x's shape, or made when None. Returns out."""
    t = x.shape[0]
    kernel = kernels[0] if t == 1 else kernels[1] if t <= FEW_T else kernels[2]
    kernel(out, np.ascontiguousarray(x), *_flat(_acts_buffer(buf, *x.shape)), *weight)
    return out
