"""numba.cuda attention over the paged KV cache: RoPE + QK-norm + KV store in one launch (`rope_qk_store`, reference
in kernels.cuda_ref) and `attention_rows` (reference: kernels.kv.attention_rows).

The cache is kernels/kv.py's layout with its arrays on the device: one layer's KVBlocks of blocks [NB, nkv, BS, d]
in float32, float16 (the host holds fp16 as uint16 bits; the device has the type) or int8 with one fp32 scale per
(block, head, offset); position p of sequence s is at block tables[s, p // BS], offset p % BS. What the storage type
changes is in `_codec`'s device functions, the one place both kernels meet it: int8 is quantized per token and
head as kernels.kv.encode does (scale max|x| / 127, values rint(x / scale)) and read back as value x scale.

attention_rows runs one block per (row, query head, split of the row's positions): each warp of the block scores
PW positions at a time, every AW * PW-th run of them in the split, with its own online softmax (running max, sum and
weighted values, the head's dims spread over the lanes), the warps are merged at the end, and with more than one
split a second launch merges the splits' partial results (max, sum, unnormalized output). A split is a run of whole
blocks, as many as it takes to cover the row's own length in the launch's splits (at least SPLIT positions): the
kernel reads the length from device memory, so a replayed CUDA graph splits a grown sequence anew; a split past a
row's last position does no work.
"""
import math
from functools import lru_cache

import numpy as np
from numba import cuda, float32, int32

from .cuda_common import WARP, block_max, block_sum, launch, warp_allsums

AW = 4        # warps per attention block
PW = 4        # positions a warp scores at once (independent loads in flight; one reduction for all of them)
SPLIT = 256   # positions per split at least
MAX_SPLITS = 16   # splits per row at most: a longer sequence gets longer splits
KINDS = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", np.dtype(np.int8): "int8"}


def _threads(n):
    return max(WARP, -(-n // WARP) * WARP)


@lru_cache(maxsize=None)
def _codec(kind):
    """Device functions of a storage kind: (amax(v, red, tid, nthreads): a head vector's largest |value| given each
    thread's; scale_of(amax) -> (scale, 1 / scale); enc(x, inv): the stored value of x; put_scale(s, b, h, o,
    scale); scale_at(s, b, h, o): what a stored value is multiplied by). Only int8 has scales: the others' are 1
    and their amax costs no barrier."""
    if kind == "int8":
        @cuda.jit(device=True)
        def amax(v, red, tid, nthreads):
            return block_max(v, red, tid, nthreads)

        @cuda.jit(device=True)
        def scale_of(m):
            s = m / float32(127.0)
            return s, (float32(1.0) / s if s > float32(0.0) else float32(0.0))

        @cuda.jit(device=True)
        def enc(x, inv):
            return round(x * inv)   # rint, ties to even (as np.rint); |x * inv| <= 127

        @cuda.jit(device=True)
        def put_scale(s, b, h, o, scale):
            s[b, h, o] = scale

        @cuda.jit(device=True)
        def scale_at(s, b, h, o):
            return s[b, h, o]
        return amax, scale_of, enc, put_scale, scale_at

    @cuda.jit(device=True)
    def amax(v, red, tid, nthreads):
        return v

    @cuda.jit(device=True)
    def scale_of(m):
        return float32(1.0), float32(1.0)

    @cuda.jit(device=True)
    def enc(x, inv):
        return x   # rounded to the blocks' type by the store (fp16: to nearest even)

    @cuda.jit(device=True)
    def put_scale(s, b, h, o, scale):
        pass

    @cuda.jit(device=True)
    def scale_at(s, b, h, o):
        return float32(1.0)
    return amax, scale_of, enc, put_scale, scale_at


def _kind(kv):
    return KINDS[np.dtype(kv.k.dtype)]


def _scales(kv):
    # int8 blocks' scales; the other kinds have none (their keys and values stand in, never read)
    return (kv.k_scale, kv.v_scale) if _kind(kv) == "int8" else (kv.k, kv.v)


@lru_cache(maxsize=None)
def _rope_qk_store(nh, nkv, d, bs, has_norm, kind):
    half = d // 2
    NT = _threads(half)
    amax, scale_of, enc, put_scale, _ = _codec(kind)

    @cuda.jit
    def kern(q, qkv, kc, vc, ks, vs, cos, sin, tables, slots, positions, qn, kn, eps):
        # block (row t, head h): h < nh a query head, then nkv key heads, then nkv value heads
        t, h, i = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        red = cuda.shared.array(NT, float32)
        p = positions[t]
        b, o = tables[slots[t], p // bs], p % bs
        if h < nh + nkv:
            j = min(i, half - 1)   # threads past half take part in the block's sums only
            x, y = qkv[t, h * d + j], qkv[t, h * d + j + half]
            c, s = cos[p, j], sin[p, j]
            ra, rb = x * c - y * s, y * c + x * s
            if has_norm:
                ss = ra * ra + rb * rb if i < half else float32(0.0)
                r = float32(1.0) / math.sqrt(block_sum(ss, red, i, NT) / float32(d) + float32(eps))
                w = qn if h < nh else kn
                ra, rb = ra * r * w[j], rb * r * w[j + half]
            if h < nh:
                if i < half:
                    q[t, h, j] = ra
                    q[t, h, j + half] = rb
            else:
                hk = h - nh
                scale, inv = scale_of(amax(max(abs(ra), abs(rb)) if i < half else float32(0.0), red, i, NT))
                if i < half:
                    kc[b, hk, o, j] = enc(ra, inv)
                    kc[b, hk, o, j + half] = enc(rb, inv)
                if i == 0:
                    put_scale(ks, b, hk, o, scale)
        else:
            hv = h - nh - nkv
            first = (nh + nkv + hv) * d
            m = float32(0.0)
            for k in range(i, d, NT):
                m = max(m, abs(qkv[t, first + k]))
            scale, inv = scale_of(amax(m, red, i, NT))
            for k in range(i, d, NT):
                vc[b, hv, o, k] = enc(qkv[t, first + k], inv)
            if i == 0:
                put_scale(vs, b, hv, o, scale)
    return kern, NT


def rope_qk_store(q, qkv, kv, cos, sin, tables, slots, positions, q_norm, k_norm, eps):
    # see kernels.cuda_ref.rope_qk_store; kv: this layer's KVBlocks of device arrays; q_norm of size 0: no QK-norm
    T, nh, d = q.shape
    nkv, bs = kv.k.shape[1], kv.k.shape[2]
    has_norm = q_norm.size > 0
    kern, nt = _rope_qk_store(nh, nkv, d, bs, has_norm, _kind(kv))
    qn, kn = (q_norm, k_norm) if has_norm else (cos[0], cos[0])   # never read without a norm
    launch(kern, (T, nh + 2 * nkv), nt, q, qkv, kv.k, kv.v, *_scales(kv), cos, sin, tables, slots, positions,
           qn, kn, eps)
    return q


@lru_cache(maxsize=None)
def _attention(nh, nkv, d, bs, min_blocks, splits, kind):
    DPL = -(-d // WARP)   # head dims per lane
    DW = DPL * WARP       # array shapes must be plain constants for the CUDA compiler
    NT = AW * WARP
    group = nh // nkv
    scale = np.float32(1.0 / np.sqrt(d))
    scale_at = _codec(kind)[4]

    @cuda.jit
    def attn(out, part, q, kc, vc, ks, vs, tables, slots, positions):
        t, h, sp = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        tid = cuda.threadIdx.x
        warp, lane = tid // WARP, tid % WARP
        red = cuda.shared.array((PW, NT), float32)
        sc = cuda.local.array(PW, float32)
        blk = cuda.local.array(PW, int32)
        off = cuda.local.array(PW, int32)
        wm = cuda.shared.array(AW, float32)
        wl = cuda.shared.array(AW, float32)
        wacc = cuda.shared.array((AW, DW), float32)
        sl, kvh = slots[t], h // group
        n = positions[t] + 1
        per = max(min_blocks, (-(-n // bs) + splits - 1) // splits) * bs   # this row's positions per split
        start = sp * per
        end = min(n, start + per)
        qr = cuda.local.array(DPL, float32)
        acc = cuda.local.array(DPL, float32)
        for i in range(DPL):
            dd = lane + WARP * i
            qr[i] = q[t, h, dd] * scale if dd < d else float32(0.0)
            acc[i] = float32(0.0)
        m = float32(-np.inf)
        l = float32(0.0)
        for r in range(0, max(0, end - start), AW * PW):   # the same trip count for every warp of the block
            first = start + r + warp * PW
            for j in range(PW):
                s = float32(0.0)
                if first + j < end:   # a warp past the split's end only joins the sums
                    b, o = tables[sl, (first + j) // bs], (first + j) % bs
                    blk[j], off[j] = b, o
                    for i in range(DPL):
                        dd = lane + WARP * i
                        if dd < d:
                            s += qr[i] * float32(kc[b, kvh, o, dd])
                    s *= scale_at(ks, b, kvh, o)
                sc[j] = s
            warp_allsums(sc, PW, red, tid)
            mn = m
            for j in range(PW):
                if first + j < end:
                    mn = max(mn, sc[j])
            if mn > -np.inf:   # some position of this warp's round is in the split
                alpha = math.exp(m - mn)
                l *= alpha
                for i in range(DPL):
                    acc[i] *= alpha
                for j in range(PW):
                    if first + j < end:
                        b, o = blk[j], off[j]
                        e = math.exp(sc[j] - mn)
                        l += e
                        e *= scale_at(vs, b, kvh, o)
                        for i in range(DPL):
                            dd = lane + WARP * i
                            if dd < d:
                                acc[i] += e * float32(vc[b, kvh, o, dd])
                m = mn
        if lane == 0:
            wm[warp] = m
            wl[warp] = l
        for i in range(DPL):
            wacc[warp, lane + WARP * i] = acc[i]
        cuda.syncthreads()
        mx = wm[0]
        for w in range(1, AW):
            mx = max(mx, wm[w])
        total = float32(0.0)
        for w in range(AW):
            if wm[w] > -np.inf:
                total += wl[w] * math.exp(wm[w] - mx)
        for dd in range(tid, d, NT):
            o = float32(0.0)
            for w in range(AW):
                if wm[w] > -np.inf:
                    o += wacc[w, dd] * math.exp(wm[w] - mx)
            if splits == 1:
                out[t, h, dd] = o / total
            else:
                part[t, h, sp, dd] = o
        if splits > 1 and tid == 0:
            part[t, h, sp, d] = mx
            part[t, h, sp, d + 1] = total

    @cuda.jit
    def merge(out, part):
        # out[t, h] from the splits' (unnormalized output, max, sum); split 0 always holds position 0
        t, h = cuda.blockIdx.x, cuda.blockIdx.y
        mx = part[t, h, 0, d]
        for s in range(1, splits):
            mx = max(mx, part[t, h, s, d])
        total = float32(0.0)
        for s in range(splits):
            if part[t, h, s, d] > -np.inf:
                total += part[t, h, s, d + 1] * math.exp(part[t, h, s, d] - mx)
        for dd in range(cuda.threadIdx.x, d, NT):
            o = float32(0.0)
            for s in range(splits):
                if part[t, h, s, d] > -np.inf:
                    o += part[t, h, s, dd] * math.exp(part[t, h, s, d] - mx)
            out[t, h, dd] = o / total
    return attn, merge, NT


def splits_of(max_blocks, bs, split=None):
    """Splits of a launch over sequences of up to max_blocks blocks of bs positions: one when a sequence fits
    `split` positions (default SPLIT), else up to MAX_SPLITS."""
    return min(MAX_SPLITS, -(-(max_blocks * bs) // (split or SPLIT)))


def attention_rows(out, q, kv, tables, slots, positions, split=None, partials=None):
    # see kernels.kv.attention_rows (device arrays; tables int32[n, max blocks]); split: positions per split at
    # least (default SPLIT); partials: float32 scratch of at least T * nh * splits * (d + 2) values (splits_of) when
    # there is more than one split
    T, nh, d = q.shape
    nkv, bs = kv.k.shape[1], kv.k.shape[2]
    split = split or SPLIT
    splits = splits_of(tables.shape[1], bs, split)
    attn, merge, nt = _attention(nh, nkv, d, bs, max(1, split // bs), splits, _kind(kv))
    args = (q, kv.k, kv.v, *_scales(kv), tables, slots, positions)
    if splits == 1:
        launch(attn, (T, nh, 1), nt, out, out.reshape(T, nh, 1, d), *args)
        return out
    if partials is None:
        partials = cuda.device_array(T * nh * splits * (d + 2), np.float32)
    part = partials[:T * nh * splits * (d + 2)].reshape(T, nh, splits, d + 2)
    launch(attn, (T, nh, splits), nt, out, part, *args)
    launch(merge, (T, nh), nt, out, part)
    return out
