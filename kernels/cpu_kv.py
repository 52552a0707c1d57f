"""The paged KV cache in Numba: kernels/kv.py's storage conversions (encode on store, load on read), the store
kernel, and the row checks of the public wrappers.

fp16 is IEEE half bits in uint16 (Numba has no float16 on the CPU): two LLVM intrinsics, `fptrunc float -> half`
and `fpext half -> float`, which LLVM lowers to F16C's vcvtps2ph / vcvtph2ps (round to nearest even, subnormals,
inf and nan as NumPy's astype(float16)), eight lanes at a time in a loop.
`kv_rows` is the one place where the attention kernels read stored keys and values (decode and prefill alike).
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .cpu_math import JIT
from .kv import INT8_MAX

# The store compiles without fastmath: arcp would turn amax / 127 into amax * (1 / 127) and x * (1 / scale) into
# x / scale, and the stored bytes must equal kv.encode's exactly. fastmath=False is spelled out because Numba
# otherwise inherits the caller's fastmath flag (CPUTargetOptions.finalize), so a fused layer compiled with fastmath
# would compile these into different bytes.
EXACT = {"cache": True, "error_model": "numpy", "fastmath": False}


@intrinsic
def f16_bits(typingctx, x):
    # float32 -> its nearest IEEE half, as uint16 bits
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def f16_value(typingctx, x):
    # IEEE half bits (uint16) -> float32 (exact)
    if x != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


# ---- encode: one row x[d] (fp32) into dst[b, h, o] in the blocks' storage -----------------------------------

def encode_row(dst, scales, b, h, o, x):
    """Numba only: kv.encode of one row, written to dst[b, h, o] (and scales[b, h, o] for int8)."""
    raise NotImplementedError("encode_row compiles inside Numba code only")


def _encode_fp32(dst, scales, b, h, o, x):
    row = dst[b, h, o]
    for i in range(x.shape[0]):
        row[i] = x[i]


def _encode_fp16(dst, scales, b, h, o, x):
    row = dst[b, h, o]
    for i in range(x.shape[0]):
        row[i] = f16_bits(x[i])


def _encode_int8(dst, scales, b, h, o, x):
    # kv.encode: scale = max|x| / 127, values rint(x * (1 / scale)); a zero (or underflowing) scale stores zeros
    row = dst[b, h, o]
    amax = np.float32(0.0)
    for i in range(x.shape[0]):
        amax = max(amax, abs(x[i]))
    scale = amax / np.float32(INT8_MAX)
    inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
    for i in range(x.shape[0]):
        row[i] = np.int8(np.rint(x[i] * inv))
    scales[b, h, o] = scale


@overload(encode_row, jit_options=EXACT)
def _encode_row(dst, scales, b, h, o, x):
    return {types.float32: _encode_fp32, types.uint16: _encode_fp16, types.int8: _encode_int8}[dst.dtype]


@njit(**EXACT)
def store_kv_kernel(kv, k, v, tables, slots, positions):
    # kv: KVBlocks of one layer; k, v[T, nkv, d] fp32 go to position positions[t] of sequence slots[t] (the
    # caller checked the rows: check_rows)
    bs = kv.k.shape[2]
    for t in range(k.shape[0]):
        p = positions[t]
        b = tables[slots[t], p // bs]
        for h in range(k.shape[1]):
            encode_row(kv.k, kv.k_scale, b, h, p % bs, k[t, h])
            encode_row(kv.v, kv.v_scale, b, h, p % bs, v[t, h])


# ---- load: the KV access of the attention kernels -----------------------------------------------------------

def kv_rows(buf, x, scales, b, h, n):
    """Numba only: fp32 rows 0..n-1 of block b, head h of stored keys or values x[NB, nkv, BS, d] (with their
    int8 scales): x's own memory for fp32, else converted into buf[BS, d] and returned."""
    raise NotImplementedError("kv_rows compiles inside Numba code only")


def _rows_fp32(buf, x, scales, b, h, n):
    return x[b, h]


def _rows_fp16(buf, x, scales, b, h, n):
    xb = x[b, h]
    for r in range(n):
        src, dst = xb[r], buf[r]
        for i in range(src.shape[0]):
            dst[i] = f16_value(src[i])
    return buf


def _rows_int8(buf, x, scales, b, h, n):
    xb, sb = x[b, h], scales[b, h]
    for r in range(n):
        src, dst, s = xb[r], buf[r], sb[r]
        for i in range(src.shape[0]):
            dst[i] = np.float32(src[i]) * s
    return buf


@overload(kv_rows, jit_options=JIT)
def _kv_rows(buf, x, scales, b, h, n):
    return {types.float32: _rows_fp32, types.uint16: _rows_fp16, types.int8: _rows_int8}[x.dtype]


# ---- the public wrappers' checks ------------------------------------------------------------------------------

def check_rows(kv, tables, slots, positions, T, attend):
    """The kernels index raw memory through the rows: every slot must be a row of `tables`, every position's block
    inside its table, and every block the row touches (all of 0..p's for attention, p's for a store) inside the
    pool. Returns (tables, slots, positions) as int32 / int64 / int64 arrays."""
    tables = np.asarray(tables)
    slots, positions = np.asarray(slots), np.asarray(positions)
    if tables.ndim != 2 or tables.dtype.kind not in "iu":
        raise ValueError(f"tables: an integer [sequences, blocks] array expected, got {tables.dtype} {tables.shape}")
    for name, a in (("slots", slots), ("positions", positions)):
        if a.shape != (T,) or (T and a.dtype.kind not in "iu"):
            raise ValueError(f"{name}: {T} integers (one per row) expected, got {a.dtype} {a.shape}")
    if kv.k.shape != kv.v.shape or kv.k.dtype != kv.v.dtype or kv.k.ndim != 4:
        raise ValueError(f"kv: k and v blocks [NB, nkv, BLOCK, d] of one shape and type expected, got "
                         f"{kv.k.shape} {kv.k.dtype} and {kv.v.shape} {kv.v.dtype}")
    nblocks, _, bs, _ = kv.k.shape
    if kv.k.dtype == np.int8 and not (kv.k_scale.shape == kv.v_scale.shape == kv.k.shape[:3]):
        raise ValueError(f"kv: int8 blocks need scales of shape {kv.k.shape[:3]}, got {kv.k_scale.shape}")
    tables = tables.astype(np.int32, copy=False)
    slots, positions = slots.astype(np.int64, copy=False), positions.astype(np.int64, copy=False)
    if T == 0:
        return tables, slots, positions
    if slots.min() < 0 or slots.max() >= tables.shape[0]:
        raise ValueError(f"slots: rows of tables (0..{tables.shape[0] - 1}) expected, got {slots.min()}..{slots.max()}")
    if positions.min() < 0 or positions.max() // bs >= tables.shape[1]:
        raise ValueError(f"positions: 0..{tables.shape[1] * bs - 1} ({tables.shape[1]} blocks of {bs}) expected, "
                         f"got {positions.min()}..{positions.max()}")
    last = positions // bs
    if attend:   # every block 0..last of each slot's table
        need = np.zeros(tables.shape[0], np.int64)
        np.maximum.at(need, slots, last + 1)
        used = tables[np.arange(tables.shape[1]) < need[:, None]]
    else:
        used = tables[slots, last]
    if used.min() < 0 or used.max() >= nblocks:
        raise ValueError(f"tables: block ids 0..{nblocks - 1} expected where rows read or write, got "
                         f"{used.min()}..{used.max()}")
    return tables, slots, positions
