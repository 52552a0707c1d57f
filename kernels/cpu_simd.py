"""LLVM vector types and intrinsics for the Numba CPU kernels (q4_cpu, q8_cpu, cpu_linear, moe_cpu).

Numba has no SIMD types, so this module adds three LLVM vector types (16 x i32, 16 x f32, 64 x u8) and a few
intrinsics over them; each kernel is then ordinary Numba code whose loop-carried vectors stay in registers.
The one instruction that matters is VPDPBUSD (AVX-512 VNNI): 64 u8 x s8 products summed four at a time into 16
int32 lanes, i.e. 16 rows x 4 k of a weight tile against four broadcast int8 activations. Hosts without VNNI get
the same arithmetic as plain LLVM vector code.
"""
import llvmlite.binding as ll
from llvmlite import ir
from numba import config, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, register_model


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
        raise TypingError(f"vector intrinsic: expected a C-contiguous {dtype} array, got {ary}")


def _load64(context, builder, sig, args):
    # codegen of the 64 bytes at w[off:] for an intrinsic (w, off, ...), as u8x64
    return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], U8.llvm_type()), align=1)


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
