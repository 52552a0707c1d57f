"""Numba CPU causal GQA attention over the paged KV cache (kernels/kv.py): one flash-attention pass serves decode
and prefill.

Rows are grouped into query blocks: consecutive rows of one sequence at consecutive positions (a prefill chunk)
make blocks of up to MAXQ query vectors (rows x the `group` query heads of a kv head); rows of different sequences
(a batch decode step) are a block each. A work item is (query block, kv head): its query vectors share every key
and value load. Keys go one cache block at a time: `kv_rows` (cpu_kv, the KV access) hands the block over as fp32
once for all vectors, the block's scores land in a small scratch [M, BLOCK], an online softmax (running max and sum
per vector) rescales the accumulators when the max moves, and the values are accumulated. Blocks past the item's
last position are never visited; in the diagonal block a vector's scores past its own position are zeroed after
the exp. Dot products take two query vectors by four keys per pass over d (shared loads, eight accumulators).

Few long items (decode at depth: one row, nkv items) are split along the keys into units so that every core
works on the one sequence; a split unit leaves its unnormalised output, max and sum, merged exactly afterwards.
Where blocks start and where a row's keys are split depend only on that row's position (never on the other rows of
the call), so a row's output is the same bits alone, in a batch, or after a cached prefix of whole cache blocks.
"""
import math

import numpy as np
from numba import njit, prange

from .cpu_kv import kv_rows
from .cpu_math import JIT, ONE, ZERO, exp_inplace

MAXQ = 64        # query vectors per item: their accumulators and scores ([M, d] + [M, BLOCK] fp32) stay in L2
TARGET = 16      # units a call aims for (so that several cores stay busy to the end)
MIN_KEYS = 256   # keys per split unit at least: a unit's launch and merge cost less than its work
CHUNK = 1 << 16  # multiply-adds per parallel chunk; a single chunk runs serially (cheaper than a launch)
MAX_CHUNKS = 256


@njit(**JIT)
def _scores(s, qs, M, kb, nj, scale):
    # s[m, j] = (qs[m] . kb[j]) * scale for m < M, j < nj: four vectors by two keys per pass over d (eight
    # accumulators: measured faster than two by four), the vectors left over by four keys
    d = qs.shape[1]
    for m in range(0, M - 3, 4):
        q0, q1, q2, q3 = qs[m], qs[m + 1], qs[m + 2], qs[m + 3]
        for j in range(0, nj - 1, 2):
            k0, k1 = kb[j], kb[j + 1]
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            for i in range(d):
                x, y = k0[i], k1[i]
                a0, a1, a2, a3 = a0 + x * q0[i], a1 + x * q1[i], a2 + x * q2[i], a3 + x * q3[i]
                b0, b1, b2, b3 = b0 + y * q0[i], b1 + y * q1[i], b2 + y * q2[i], b3 + y * q3[i]
            s[m, j], s[m + 1, j], s[m + 2, j], s[m + 3, j] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
            s[m, j + 1], s[m + 1, j + 1], s[m + 2, j + 1], s[m + 3, j + 1] = (b0 * scale, b1 * scale, b2 * scale,
                                                                              b3 * scale)
        if nj % 2:
            k0 = kb[nj - 1]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for i in range(d):
                x = k0[i]
                a0, a1, a2, a3 = a0 + x * q0[i], a1 + x * q1[i], a2 + x * q2[i], a3 + x * q3[i]
            s[m, nj - 1], s[m + 1, nj - 1], s[m + 2, nj - 1], s[m + 3, nj - 1] = (a0 * scale, a1 * scale, a2 * scale,
                                                                                  a3 * scale)
    for m in range(M - M % 4, M):
        qv, sm = qs[m], s[m]
        j = 0
        while j + 4 <= nj:
            k0, k1, k2, k3 = kb[j], kb[j + 1], kb[j + 2], kb[j + 3]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for i in range(d):
                x = qv[i]
                a0, a1, a2, a3 = a0 + x * k0[i], a1 + x * k1[i], a2 + x * k2[i], a3 + x * k3[i]
            sm[j], sm[j + 1], sm[j + 2], sm[j + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
            j += 4
        for jj in range(j, nj):
            kj = kb[jj]
            a = np.float32(0.0)
            for i in range(d):
                a += qv[i] * kj[i]
            sm[jj] = a * scale


@njit(**JIT)
def _softmax_step(s, o, mx, lsum, lim, M, j0, nj, nb):
    # online softmax over keys j0..j0+nj-1: vector m sees those below lim[m]; s[m] becomes the weights (0 where
    # unseen), o[m] is rescaled to the new running max
    for m in range(M):
        sm = s[m]
        c = min(nj, lim[m] - j0)
        if c <= 0:
            for j in range(nj):
                sm[j] = 0.0
            continue
        mn = mx[m]
        for j in range(c):
            mn = max(mn, sm[j])
        corr = math.exp(mx[m] - mn)      # 0 on the first block (mx = -inf), where o is still 0
        mx[m] = mn
        if corr != 1.0:
            om = o[m]
            for i in range(om.shape[0]):
                om[i] *= corr
        for j in range(c):
            sm[j] -= mn
        exp_inplace(sm, nb, c)
        ps = np.float32(0.0)
        for j in range(c):
            ps += sm[j]
        for j in range(c, nj):
            sm[j] = 0.0
        lsum[m] = lsum[m] * corr + ps


@njit(**JIT)
def _accumulate(o, p, M, vb, nj):
    # o[m] += sum_j p[m, j] * vb[j] for m < M, j < nj: two vectors by four values per pass over d (an odd last
    # vector alone); no branch inside the pair loop, which kept it at half speed
    d = o.shape[1]
    for m in range(0, M - 1, 2):
        o0, o1, p0, p1 = o[m], o[m + 1], p[m], p[m + 1]
        j = 0
        while j + 4 <= nj:
            v0, v1, v2, v3 = vb[j], vb[j + 1], vb[j + 2], vb[j + 3]
            a0, a1, a2, a3 = p0[j], p0[j + 1], p0[j + 2], p0[j + 3]
            b0, b1, b2, b3 = p1[j], p1[j + 1], p1[j + 2], p1[j + 3]
            for i in range(d):
                x0, x1, x2, x3 = v0[i], v1[i], v2[i], v3[i]
                o0[i] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                o1[i] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
            j += 4
        for jj in range(j, nj):
            vj, a, b = vb[jj], p0[jj], p1[jj]
            for i in range(d):
                o0[i] += a * vj[i]
                o1[i] += b * vj[i]
    if M % 2:
        o0, p0 = o[M - 1], p[M - 1]
        for j in range(nj):
            vj, a = vb[j], p0[j]
            for i in range(d):
                o0[i] += a * vj[i]


@njit(**JIT)
def _unit(out, q, kv, table, positions, t0, R, h, k0, k1, qs, o, s, kbuf, vbuf, mx, lsum, lim, nb, part, pm, pl, po):
    # query vectors of rows t0..t0+R-1 and kv head h over keys k0..k1-1 (k0 a multiple of BLOCK) of the sequence
    # whose block table is `table`; into out (normalised) or, part >= 0, into the partials pm/pl/po[part]
    d = q.shape[2]
    bs = kv.k.shape[2]
    group = q.shape[1] // kv.k.shape[1]
    M = R * group
    for r in range(R):
        for g in range(group):
            m = r * group + g
            src, qm, om = q[t0 + r, h * group + g], qs[m], o[m]
            for i in range(d):               # copied first, so `out` may alias `q`
                qm[i] = src[i]
                om[i] = 0.0
            lim[m] = positions[t0 + r] + 1
            mx[m] = -np.inf
            lsum[m] = 0.0
    scale = np.float32(1.0 / math.sqrt(d))
    for j0 in range(k0, k1, bs):
        nj = min(bs, k1 - j0)
        b = table[j0 // bs]
        kb = kv_rows(kbuf, kv.k, kv.k_scale, b, h, nj)
        vb = kv_rows(vbuf, kv.v, kv.v_scale, b, h, nj)
        _scores(s, qs, M, kb, nj, scale)
        _softmax_step(s, o, mx, lsum, lim, M, j0, nj, nb)
        _accumulate(o, s, M, vb, nj)
    for r in range(R):
        for g in range(group):
            m = r * group + g
            om = o[m]
            if part < 0:
                dst = out[t0 + r, h * group + g]
                inv = np.float32(1.0) / lsum[m]
                for i in range(d):
                    dst[i] = om[i] * inv
            else:
                pm[part, m] = mx[m]
                pl[part, m] = lsum[m]
                dst = po[part, m]
                for i in range(d):
                    dst[i] = om[i]


@njit(**JIT)
def _units(out, q, kv, tables, slots, positions, blocks, units, mq, c, nc, pm, pl, po):
    # chunk c of nc: units c, 2nc-1-c, 2nc+c, ... of `units` (rows: query block, kv head, k0, k1, partial index
    # or -1), sorted by falling cost, so each chunk gets a large and a small one in turn; allocates its scratch
    d = q.shape[2]
    bs = kv.k.shape[2]
    qs, o = np.empty((mq, d), np.float32), np.empty((mq, d), np.float32)
    s = np.empty((mq, bs), np.float32)
    kbuf, vbuf = np.empty((bs, d), np.float32), np.empty((bs, d), np.float32)
    mx, lsum = np.empty(mq, np.float32), np.empty(mq, np.float32)
    lim = np.empty(mq, np.int64)
    nb = np.empty(bs, np.int32)
    ci = np.int64(c)                       # prange's index is unsigned: uint64 with int64 makes a float
    for r in range(-(-units.shape[0] // nc)):
        u = r * nc + (ci if r % 2 == 0 else nc - 1 - ci)
        if u >= units.shape[0]:
            continue
        qb, h, k0, k1, part = units[u, 0], units[u, 1], units[u, 2], units[u, 3], units[u, 4]
        t0, R = blocks[qb, 0], blocks[qb, 1]
        _unit(out, q, kv, tables[slots[t0]], positions, t0, R, h, k0, k1, qs, o, s, kbuf, vbuf, mx, lsum, lim, nb,
              part, pm, pl, po)


@njit(**JIT)
def _query_blocks(slots, positions, group, bs):
    # rows -> query blocks int64[nq, 2] (first row, rows): runs of one sequence at consecutive positions, cut at
    # every multiple of `rows` positions (a power of two, at most MAXQ query vectors and at most the cache block
    # size bs). Cut at fixed positions, a row lands in the same block (same vectors, same keys, the same operations)
    # whether its prompt is prefilled whole or after a cached prefix of whole cache blocks or in CHUNK-row pieces:
    # a prompt's logits do not depend on what the cache held.
    rows = 1
    while rows * 2 * group <= MAXQ and rows * 2 <= bs:
        rows *= 2
    T = slots.shape[0]
    blocks = np.empty((T, 2), np.int64)
    nq = 0
    t = 0
    while t < T:
        n = 1
        while (t + n < T and slots[t + n] == slots[t] and positions[t + n] == positions[t + n - 1] + 1
               and positions[t + n] % rows != 0):
            n += 1
        blocks[nq, 0], blocks[nq, 1] = t, n
        nq += 1
        t += n
    return blocks[:nq]


@njit(**JIT)
def _span(n, R, nkv, bs):
    # keys per unit of an item of R rows whose last row sees n keys: a one-row item is cut into about TARGET / nkv
    # units of at least MIN_KEYS keys (at cache block boundaries), a longer one not at all
    if R > 1:
        return n
    span = max(MIN_KEYS, -(-n * nkv // TARGET))
    return -(-span // bs) * bs


@njit(**JIT)
def _plan(blocks, positions, nkv, bs):
    # -> units int64[nu, 5] (query block, kv head, k0, k1, partial index or -1) by falling cost, splits int64[ns, 4]
    # (query block, kv head, first partial, partials) of the items split along the keys, and the call's cost
    # (query vectors x keys summed over units, per query head of a kv head). Only one-row items (decode) are split,
    # each by its own length alone, so a row's keys are cut at the same places alone or in a batch
    nq = blocks.shape[0]
    nu = ns = 0
    for i in range(nq):
        n = positions[blocks[i, 0] + blocks[i, 1] - 1] + 1
        n = -(-n // _span(n, blocks[i, 1], nkv, bs))
        nu += nkv * n
        ns += nkv if n > 1 else 0
    units, splits = np.empty((nu, 5), np.int64), np.empty((ns, 4), np.int64)
    cost = np.empty(nu, np.int64)
    u = si = parts = total = 0
    for i in range(nq):
        t0, R = blocks[i, 0], blocks[i, 1]
        n = positions[t0 + R - 1] + 1
        span = _span(n, R, nkv, bs)
        nsplit = -(-n // span)
        for c in range(nsplit):
            k0, k1 = c * span, min(n, (c + 1) * span)
            work = 0
            for r in range(R):
                work += max(0, min(positions[t0 + r] + 1, k1) - k0)
            for h in range(nkv):
                units[u + h * nsplit, 0], units[u + h * nsplit, 1] = i, h
                units[u + h * nsplit, 2], units[u + h * nsplit, 3] = k0, k1
                units[u + h * nsplit, 4] = parts + h * nsplit + c if nsplit > 1 else -1
                cost[u + h * nsplit] = work
            total += work * nkv
            u += 1
        if nsplit > 1:
            for h in range(nkv):
                splits[si, 0], splits[si, 1], splits[si, 2], splits[si, 3] = i, h, parts + h * nsplit, nsplit
                si += 1
            parts += nkv * nsplit
        u += (nkv - 1) * nsplit
    return units[_by_falling_cost(cost)], splits, parts, total


@njit(**JIT)
def _by_falling_cost(cost):
    # the indices of cost, largest first, ties in index order (np.argsort(-cost, kind="mergesort")): a bottom-up
    # merge sort, written out because Numba's argsort took ~3 s of a cold start to compile
    n = cost.shape[0]
    idx, tmp = np.empty(n, np.int64), np.empty(n, np.int64)
    for i in range(n):
        idx[i] = i
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j = lo, mid
            for k in range(lo, hi):
                if i < mid and (j >= hi or cost[idx[i]] >= cost[idx[j]]):
                    tmp[k] = idx[i]
                    i += 1
                else:
                    tmp[k] = idx[j]
                    j += 1
        idx, tmp = tmp, idx
        width *= 2
    return idx


@njit(**JIT)
def _merge(out, blocks, splits, group, pm, pl, po):
    # each split item's partials -> out: the exact softmax merge, every partial weighted by exp(its max - the
    # overall max)
    d = out.shape[2]
    for si in range(splits.shape[0]):
        t0, R = blocks[splits[si, 0], 0], blocks[splits[si, 0], 1]
        h, p0, n = splits[si, 1], splits[si, 2], splits[si, 3]
        for r in range(R):
            for g in range(group):
                m = r * group + g
                top = pm[p0, m]
                for p in range(p0 + 1, p0 + n):
                    top = max(top, pm[p, m])
                total = np.float32(0.0)
                for p in range(p0, p0 + n):
                    total += pl[p, m] * math.exp(pm[p, m] - top)
                dst = out[t0 + r, h * group + g]
                for i in range(d):
                    dst[i] = 0.0
                for p in range(p0, p0 + n):
                    w = math.exp(pm[p, m] - top) / total
                    src = po[p, m]
                    for i in range(d):
                        dst[i] += w * src[i]


@njit(parallel=True, **JIT)
def attention_kernel(out, q, kv, tables, slots, positions):
    # out[T, nh, d]: row t's queries q[t] attend causally to positions 0..positions[t] of sequence slots[t]
    # (block table tables[slots[t]]) of kv, a KVBlocks; the caller stored them first and checked the rows
    nh, d = q.shape[1], q.shape[2]
    nkv = kv.k.shape[1]
    if nh % nkv != 0:
        raise ValueError("attention: query heads must be a multiple of kv heads")
    group = nh // nkv
    blocks = _query_blocks(slots, positions, group, kv.k.shape[2])
    units, splits, parts, cost = _plan(blocks, positions, nkv, kv.k.shape[2])
    mq = np.int64(1)
    for i in range(blocks.shape[0]):
        mq = max(mq, blocks[i, 1] * group)
    pm, pl = np.empty((parts, mq), np.float32), np.empty((parts, mq), np.float32)
    po = np.empty((parts, mq, d), np.float32)
    nu = units.shape[0]
    # a chunk per two units or more: a static split of the chunks between threads stays balanced
    nc = max(1, min(max(16, nu // 4), nu // 2, MAX_CHUNKS, cost * group * d // CHUNK))
    if nc == 1:
        _units(out, q, kv, tables, slots, positions, blocks, units, mq, ZERO, ONE, pm, pl, po)
    else:
        for c in prange(nc):
            _units(out, q, kv, tables, slots, positions, blocks, units, mq, np.int64(c), nc, pm, pl, po)
    _merge(out, blocks, splits, group, pm, pl, po)
