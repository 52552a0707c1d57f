"""Numba INT4 kernels: `quantize_acts` and `matmul_q4` with the signatures and semantics of
tinyhun.kernels.q4 (layout and rounding described there).

Numba has no SIMD types, so this module adds three LLVM vector types (16 x i32, 16 x f32, 64 x u8) and a few
intrinsics over them; each kernel is then ordinary Numba code whose loop-carried vectors stay in registers.
The one instruction that matters is VPDPBUSD (AVX-512 VNNI): 64 u8 x s8 products summed four at a time into 16
int32 lanes, i.e. 16 rows x 4 k of a weight tile against four broadcast int8 activations. Hosts without VNNI get
the same arithmetic as plain LLVM vector code. Decode (T = 1) streams each tile once with its accumulator in a
register; a few tokens (2..FEW_T, batched decode) do the same with one register accumulator per token of a group of
FEW_GROUP; prefill unpacks each 16 x 32 block of codes once and reuses it for every token.
"""
import llvmlite.binding as ll
import numpy as np
from llvmlite import ir
from numba import config, njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, register_model

from .q4 import ACT_BLOCK, TILE, _acts_buffer, check_acts, check_matmul

# Decode prefetches the codes this many bytes ahead: hardware prefetch alone keeps too few misses in flight
# (one thread: ~10.5 GB/s without, ~14 with; 2-4 KB measured alike, 4 KB a little better with two threads).
PREFETCH = 4096
GEMM_TOKENS = 128   # prefill tokens per pass over the weight (their int8 activations: 128 x K bytes, in L2)
FEW_T = 8           # up to this many tokens take the register-accumulator kernel (_gemm_few)
FEW_GROUP = 4       # tokens per pass over a tile in _gemm_few (its a0..a3): with eight code registers, well in 32 zmm


def _has_vnni():
    # follow Numba's own target choice: a NUMBA_CPU_NAME/FEATURES override may leave VNNI out of the code
    if config.CPU_FEATURES is not None:
        return "+avx512vnni" in config.CPU_FEATURES.split(",")
    return config.CPU_NAME in (None, "host") and bool(ll.get_host_cpu_features().get("avx512vnni"))


VNNI = _has_vnni()


class Vec(types.Type):
    """An LLVM vector <lanes x kind> living in registers."""

    def __init__(self, kind, lanes):
        self.kind, self.lanes = kind, lanes
        super().__init__(name=f"{kind}x{lanes}")

    def llvm_type(self):
        elem = {"i8": ir.IntType(8), "i32": ir.IntType(32), "f32": ir.FloatType()}[self.kind]
        return ir.VectorType(elem, self.lanes)


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm_type())


I32, F32, U8 = Vec("i32", 16), Vec("f32", 16), Vec("i8", 64)
_i32 = ir.IntType(32)


def _ptr(context, builder, aryty, ary, off, llty):
    # address of flat element `off` of a C-contiguous array, as llty*
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [off]), llty.as_pointer())


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_i32, 16), [0] * 16))


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _check(ary, dtype):
    # intrinsics read raw memory at flat offsets: insist on the element type and a C-contiguous layout
    if not (isinstance(ary, types.Array) and ary.layout == "C" and ary.dtype == dtype):
        raise TypingError(f"q4 intrinsic: expected a C-contiguous {dtype} array, got {ary}")


def _load64(context, builder, sig, args):
    # codegen of the 64 bytes at w[off:] for an intrinsic (w, off, ...), as u8x64
    return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], U8.llvm_type()), align=1)


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


def _dot_generic(builder, acc, codes, xv):
    # acc[i] += sum_j codes[4i+j] * x[4i+j], u8 x s8: the portable form of VPDPBUSD
    wide = ir.VectorType(_i32, 64)
    prod = builder.mul(builder.zext(codes, wide), builder.sext(builder.bitcast(xv, U8.llvm_type()), wide))
    for j in range(4):
        acc = builder.add(acc, builder.shuffle_vector(prod, ir.Constant(wide, ir.Undefined),
                                                      ir.Constant(ir.VectorType(_i32, 16), list(range(j, 64, 4)))))
    return acc


@intrinsic
def _dot(typingctx, acc, codes, x, off):
    """acc (i32x16) + per lane i: sum_j codes[4i + j] * x[off + j] with x int8, codes u8x64."""
    _check(x, types.int8)

    def codegen(context, builder, sig, args):
        acc, codes, x, off = args
        x4 = builder.load(_ptr(context, builder, sig.args[2], x, off, _i32), align=1)
        xv = _splat(builder, x4, I32.llvm_type())
        if VNNI:
            vty = I32.llvm_type()
            return _call(builder, "llvm.x86.avx512.vpdpbusd.512", vty, [acc, builder.bitcast(codes, vty), xv])
        return _dot_generic(builder, acc, codes, xv)
    return I32(acc, codes, x, off), codegen


@intrinsic
def _splat_i(typingctx, v):
    def codegen(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.int32), I32.llvm_type())
    return I32(v), codegen


@intrinsic
def _splat_f(typingctx, v):
    def codegen(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.float32), F32.llvm_type())
    return F32(v), codegen


@intrinsic
def _fma(typingctx, acc, a, b):
    """acc + a * b on f32x16; an i32x16 `a` is converted to float first."""
    def codegen(context, builder, sig, args):
        vty = F32.llvm_type()
        a = builder.sitofp(args[1], vty) if sig.args[1] == I32 else args[1]
        return _call(builder, "llvm.fma.v16f32", vty, [a, args[2], args[0]])
    return F32(acc, a, b), codegen


@intrinsic
def _mul(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])
    return F32(a, b), codegen


@intrinsic
def _load_h(typingctx, a, off):
    """16 fp16 at a[off:] -> f32x16; `a` is the fp16 array viewed as uint16 (Numba has no fp16 arrays)."""
    _check(a, types.uint16)

    def codegen(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, sig.args[0], *args, ir.VectorType(ir.IntType(16), 16)), align=2)
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 16)), F32.llvm_type())
    return F32(a, off), codegen


@intrinsic
def _load_f(typingctx, a, off):
    _check(a, types.float32)

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], *args, F32.llvm_type()), align=4)
    return F32(a, off), codegen


@intrinsic
def _store_f(typingctx, a, off, v):
    _check(a, types.float32)

    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1], F32.llvm_type()), align=4)
        return context.get_dummy_value()
    return types.none(a, off, v), codegen


@intrinsic
def _lane(typingctx, v, i):
    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], context.cast(builder, args[1], sig.args[1], types.int32))
    return types.float32(v, i), codegen


def _tree(builder, v, combine):
    # combine the lanes of v pairwise, halving the width each step; returns lane 0
    n = v.type.count
    while n > 1:
        n //= 2
        half = [builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                       ir.Constant(ir.VectorType(_i32, n), list(range(i, i + n)))) for i in (0, n)]
        v = combine(*half)
    return builder.extract_element(v, ir.Constant(_i32, 0))


@intrinsic
def _reduce_f(typingctx, v, absmax):
    """f32x16 -> max |lane| (absmax=True) or the sum of the lanes, as float32."""
    def codegen(context, builder, sig, args):
        if sig.args[1].literal_value:
            a = _call(builder, "llvm.fabs.v16f32", F32.llvm_type(), [args[0]])
            return _tree(builder, a, lambda p, q: builder.select(builder.fcmp_ordered(">", p, q), p, q))
        return _tree(builder, args[0], builder.fadd)
    if not isinstance(absmax, types.BooleanLiteral):
        raise TypingError("_reduce_f needs a literal True/False")
    return types.float32(v, absmax), codegen


@intrinsic
def _round_store(typingctx, q, off, v, inv):
    """q[off:off+16] = int8(rint(v * inv)) (round half to even, as np.rint); returns their sum as int32."""
    _check(q, types.int8)

    def codegen(context, builder, sig, args):
        fty = F32.llvm_type()
        inv = context.cast(builder, args[3], sig.args[3], types.float32)
        scaled = builder.fmul(args[2], _splat(builder, inv, fty))
        ints = builder.fptosi(_call(builder, "llvm.rint.v16f32", fty, [scaled]), I32.llvm_type())
        i8 = ir.VectorType(ir.IntType(8), 16)
        builder.store(builder.trunc(ints, i8), _ptr(context, builder, sig.args[0], args[0], args[1], i8), align=1)
        return _tree(builder, ints, builder.add)
    return types.int32(q, off, v, inv), codegen


@intrinsic
def _prefetch(typingctx, a, off):
    """Hint that a[off:off+64] will be read soon."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], *args, ir.IntType(8))
        fnty = ir.FunctionType(ir.VoidType(), [p.type, _i32, _i32, _i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [p, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
        return context.get_dummy_value()
    return types.none(a, off), codegen


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
