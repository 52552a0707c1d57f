"""Numba CPU causal GQA attention in one pass over the KV cache, with an online (running max and sum) softmax.

A work item is one (token, kv head): the `group` query heads sharing that kv head are handled together, so each
key and value row comes from memory once for all of them. Keys go BLK at a time: the block's scores land in a
small scratch, the running max moves and the output rows (the accumulators) are rescaled once per block, and
the exps run as one vectorized loop. Dot products and value sums take four keys per pass over d, sharing the
loads of q (or of the output row).
"""
import math

import numpy as np
from numba import njit, prange

from .cpu_math import JIT, exp_inplace

BLK = 32          # keys per block: the block's K and V rows (2 * 32 * d floats) stay in L1 across the group
CHUNK = 1 << 16   # multiply-adds per parallel chunk; a single chunk runs serially (cheaper than a launch)
MAX_CHUNKS = 256  # each chunk allocates its own small scratch


@njit(**JIT)
def _scores(s, qv, kc, h, j0, j1, scale):
    # s[j - j0] = (qv . k[h, j]) * scale for j in j0..j1-1
    j = j0
    while j + 4 <= j1:
        k0, k1, k2, k3 = kc[h, j], kc[h, j + 1], kc[h, j + 2], kc[h, j + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for i in range(qv.shape[0]):
            v = qv[i]
            a0, a1, a2, a3 = a0 + k0[i] * v, a1 + k1[i] * v, a2 + k2[i] * v, a3 + k3[i] * v
        b = j - j0
        s[b], s[b + 1], s[b + 2], s[b + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        j += 4
    for jj in range(j, j1):
        kj = kc[h, jj]
        a = np.float32(0.0)
        for i in range(qv.shape[0]):
            a += kj[i] * qv[i]
        s[jj - j0] = a * scale


@njit(**JIT)
def _accumulate(o, p, vc, h, j0, j1):
    # o[d] += sum_j p[j - j0] * v[h, j]
    j = j0
    while j + 4 <= j1:
        v0, v1, v2, v3 = vc[h, j], vc[h, j + 1], vc[h, j + 2], vc[h, j + 3]
        b = j - j0
        p0, p1, p2, p3 = p[b], p[b + 1], p[b + 2], p[b + 3]
        for i in range(o.shape[0]):
            o[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i]
        j += 4
    for jj in range(j, j1):
        vj = vc[h, jj]
        pj = p[jj - j0]
        for i in range(o.shape[0]):
            o[i] += pj * vj[i]


@njit(**JIT)
def _item(out, q, kc, vc, n, t, h, qs, sc, nb, mx, lsum):
    # one (row t, kv head h) over keys 0..n-1 of kc/vc[nkv, S, d]; scratch qs[group, d], sc[group, BLK],
    # nb int32[BLK], running max/sum mx/lsum[group]
    group = qs.shape[0]
    d = qs.shape[1]
    scale = np.float32(1.0 / math.sqrt(d))
    for g in range(group):
        qg = q[t, h * group + g]
        for i in range(d):                   # copied first, so `out` may alias `q`; a loop, not a slice
            qs[g, i] = qg[i]                 # assignment, whose shape check costs seconds of cold compile
        mx[g] = -np.inf
        lsum[g] = 0.0
        out[t, h * group + g] = 0.0
    for j0 in range(0, n, BLK):
        j1 = min(j0 + BLK, n)
        nj = j1 - j0
        for g in range(group):
            s = sc[g]
            _scores(s, qs[g], kc, h, j0, j1, scale)
            mn = mx[g]
            for j in range(nj):
                mn = max(mn, s[j])
            corr = math.exp(mx[g] - mn)      # 0 on the first block (mx = -inf), where out is still 0
            mx[g] = mn
            if corr != 1.0:
                o = out[t, h * group + g]
                for i in range(d):
                    o[i] *= corr
            for j in range(nj):
                s[j] -= mn
            exp_inplace(s, nb, nj)
            ps = np.float32(0.0)
            for j in range(nj):
                ps += s[j]
            lsum[g] = lsum[g] * corr + ps
            _accumulate(out[t, h * group + g], s, vc, h, j0, j1)
    for g in range(group):
        o = out[t, h * group + g]
        inv = np.float32(1.0) / lsum[g]
        for i in range(d):
            o[i] *= inv


@njit(**JIT)
def _items(out, q, kc, vc, slots, positions, first, step, group):
    # items first, first+step, ... below T * nkv, item = t * nkv + h; allocates this run's small scratch
    nkv = kc.shape[1]
    d = q.shape[2]
    qs = np.empty((group, d), np.float32)
    sc = np.empty((group, BLK), np.float32)
    nb = np.empty(BLK, np.int32)
    mx = np.empty(group, np.float32)
    lsum = np.empty(group, np.float32)
    for it in range(first, q.shape[0] * nkv, step):
        t = it // nkv
        _item(out, q, kc[slots[t]], vc[slots[t]], positions[t] + 1, t, it - t * nkv, qs, sc, nb, mx, lsum)


@njit(parallel=True, **JIT)
def attention_kernel(out, q, k_cache, v_cache, slots, positions):
    # out[T, nh, d], q[T, nh, d]: row t attends to keys 0..positions[t] of slot slots[t] of k_cache/v_cache
    # [B, nkv, S, d] (the caller stored them first, and checked the rows: check_rows)
    T, nh, d = q.shape
    nkv = k_cache.shape[1]
    if nh % nkv != 0:
        raise ValueError("attention: query heads must be a multiple of kv heads")
    group = nh // nkv
    items = T * nkv
    keys = 0
    for t in range(T):
        keys += positions[t] + 1
    nc = max(1, min(items, MAX_CHUNKS, nh * keys * d // CHUNK))
    if nc == 1:
        _items(out, q, k_cache, v_cache, slots, positions, 0, 1, group)
        return
    # rows at later positions attend to more keys: chunk c takes items c, c+nc, ... so chunks get equal work
    for c in prange(nc):
        _items(out, q, k_cache, v_cache, slots, positions, c, nc, group)


def check_rows(k_cache, v_cache, slots, positions, T):
    """The kernels index raw memory with slots and positions: every row must name a slot and a position the cache
    has. Checked where rows come from outside (the public wrappers); the model makes its own rows in range."""
    if len(slots) != T or len(positions) != T or k_cache.shape != v_cache.shape:
        raise ValueError("attention: one slot and one position per row, and k/v caches of one shape, expected")
    if T and not (0 <= slots.min() and slots.max() < k_cache.shape[0] and 0 <= positions.min()
                  and positions.max() < k_cache.shape[2]):
        raise ValueError("attention: a row's slot or position is outside the cache")


@njit(**JIT)
def store_kv_kernel(k_cache, v_cache, k, v, slots, positions):
    # k_cache/v_cache[B, nkv, S, d] <- k, v[T, nkv, d] at (slots[t], positions[t])
    # element loops, not slice assignments: Numba compiles a broadcasting shape check (and its error message
    # formatting) for each of those, seconds of a layer's cold compile
    for t in range(k.shape[0]):
        for h in range(k.shape[1]):
            kd, vd = k_cache[slots[t], h, positions[t]], v_cache[slots[t], h, positions[t]]
            ks, vs = k[t, h], v[t, h]
            for i in range(ks.shape[0]):
                kd[i] = ks[i]
                vd[i] = vs[i]
