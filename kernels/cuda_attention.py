"""numba.cuda attention: RoPE + QK-norm + KV store in one launch (`rope_qk_store`, reference in
kernels.cuda_ref), and `attention_rows` over the device KV cache (reference: kernels.ref.attention_rows); the cache
may be fp32 or fp16 (the backend's), read as fp32.

attention_rows runs one block per (row, query head, split of the cache's positions): each warp of the block scores
PW positions at a time, every AW * PW-th run of them in the split, with its own online softmax (running max, sum and weighted values, the head's
dims spread over the lanes), the warps are merged at the end, and with more than one split a second launch merges
the splits' partial results (max, sum, unnormalized output). Splitting along the sequence keeps a long context's
decode spread over many blocks; a split past a row's last position does no work.
"""
import math
from functools import lru_cache

import numpy as np
from numba import cuda, float32

from .cuda_common import WARP, block_sum, launch, warp_allsums

AW = 4        # warps per attention block
PW = 4        # positions a warp scores at once (independent loads in flight; one reduction for all of them)
SPLIT = 256   # cache positions per split


def _threads(n):
    return max(WARP, -(-n // WARP) * WARP)


@lru_cache(maxsize=None)
def _rope_qk_store(nh, nkv, d, has_norm):
    half = d // 2
    NT = _threads(half)

    @cuda.jit
    def kern(q, qkv, kc, vc, cos, sin, slots, positions, qn, kn, eps):
        # block (row t, head h): h < nh a query head, then nkv key heads, then nkv value heads
        t, h, i = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        red = cuda.shared.array(NT, float32)
        p, sl = positions[t], slots[t]
        if h < nh + nkv:
            j = min(i, half - 1)   # threads past half take part in the norm's sum only
            a, b = qkv[t, h * d + j], qkv[t, h * d + j + half]
            c, s = cos[p, j], sin[p, j]
            ra, rb = a * c - b * s, b * c + a * s
            if has_norm:
                ss = ra * ra + rb * rb if i < half else float32(0.0)
                r = float32(1.0) / math.sqrt(block_sum(ss, red, i, NT) / float32(d) + float32(eps))
                w = qn if h < nh else kn
                ra, rb = ra * r * w[j], rb * r * w[j + half]
            if i < half:
                if h < nh:
                    q[t, h, j] = ra
                    q[t, h, j + half] = rb
                else:
                    kc[sl, h - nh, p, j] = ra
                    kc[sl, h - nh, p, j + half] = rb
        else:
            hv = h - nh - nkv
            for k in range(i, d, NT):
                vc[sl, hv, p, k] = qkv[t, (nh + nkv + hv) * d + k]   # rounded to the cache's type
    return kern, NT


def rope_qk_store(q, qkv, k_cache, v_cache, cos, sin, slots, positions, q_norm, k_norm, eps):
    # see kernels.cuda_ref.rope_qk_store; q_norm of size 0: no QK-norm
    T, nh, d = q.shape
    nkv = k_cache.shape[1]
    has_norm = q_norm.size > 0
    kern, nt = _rope_qk_store(nh, nkv, d, has_norm)
    qn, kn = (q_norm, k_norm) if has_norm else (cos[0], cos[0])   # never read without a norm
    launch(kern, (T, nh + 2 * nkv), nt, q, qkv, k_cache, v_cache, cos, sin, slots, positions, qn, kn, eps)
    return q


@lru_cache(maxsize=None)
def _attention(nh, nkv, d, split, splits):
    DPL = -(-d // WARP)   # head dims per lane
    DW = DPL * WARP       # array shapes must be plain constants for the CUDA compiler
    NT = AW * WARP
    group = nh // nkv
    scale = np.float32(1.0 / np.sqrt(d))

    @cuda.jit
    def attn(out, part, q, kc, vc, slots, positions):
        t, h, sp = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        tid = cuda.threadIdx.x
        warp, lane = tid // WARP, tid % WARP
        red = cuda.shared.array((PW, NT), float32)
        sc = cuda.local.array(PW, float32)
        wm = cuda.shared.array(AW, float32)
        wl = cuda.shared.array(AW, float32)
        wacc = cuda.shared.array((AW, DW), float32)
        sl, kvh = slots[t], h // group
        start = sp * split
        end = min(positions[t] + 1, start + split)
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
                    for i in range(DPL):
                        dd = lane + WARP * i
                        if dd < d:
                            s += qr[i] * float32(kc[sl, kvh, first + j, dd])
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
                        e = math.exp(sc[j] - mn)
                        l += e
                        for i in range(DPL):
                            dd = lane + WARP * i
                            if dd < d:
                                acc[i] += e * float32(vc[sl, kvh, first + j, dd])
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


def splits_of(max_context, split=SPLIT):
    return -(-max_context // split)


def attention_rows(out, q, k_cache, v_cache, slots, positions, split=SPLIT, partials=None):
    # see kernels.ref.attention_rows (device arrays); partials: float32 scratch of at least
    # T * nh * splits_of(S, split) * (d + 2) values when the cache's S positions need more than one split
    T, nh, d = q.shape
    nkv, S = k_cache.shape[1], k_cache.shape[2]
    splits = splits_of(S, split)
    attn, merge, nt = _attention(nh, nkv, d, split, splits)
    if splits == 1:
        launch(attn, (T, nh, 1), nt, out, out.reshape(T, nh, 1, d), q, k_cache, v_cache, slots, positions)
        return out
    if partials is None:
        partials = cuda.device_array(T * nh * splits * (d + 2), np.float32)
    part = partials[:T * nh * splits * (d + 2)].reshape(T, nh, splits, d + 2)
    launch(attn, (T, nh, splits), nt, out, part, q, k_cache, v_cache, slots, positions)
    launch(merge, (T, nh), nt, out, part)
    return out
