"""Attention over the paged KV cache on the Hunyuan-0.5B shape (16 query / 8 kv heads of 128), 2 threads:
decode at depth (one row over 4096 / 16384 cached positions: us per layer, GB/s of KV read, % of the machine's
read bandwidth measured in the same run) for fp32 / fp16 / int8 storage, and prefill (a 128-row chunk at depth
0 / 1024 / 4096, and whole 1024 / 4096-token prompts in 128-row chunks: ms) next to the kernel it replaced (commit
8925476's kernels/cpu_attention.py, copied below as `old_attention`: contiguous fp32 [B, nkv, S, d] caches).

    PYTHONSAFEPATH=1 PYTHONPATH=bench python bench/bench_attention.py [--quick] [--threads N]

--threads 1 times one thread by its CPU time (time.thread_time), which other jobs on the cores do not inflate:
the figure to compare kernels by on a busy machine (caches and memory are still shared).

Decode cycles through enough layers' pools that each pass reads 2x L3 from DRAM, as a decoder's 24 layers do;
prefill reuses one pool (its keys are read by 128 rows, so they are cache-resident anyway). Times are the best of
several runs: other jobs may share the cores; compare figures from one run.
"""
import itertools
import math
import sys
import time

import numba
import numpy as np
from numba import njit, prange

from bandwidth import BestBandwidth, cold_copies
from tinyhun.kernels import cpu, kv
from tinyhun.kernels.cpu_attention import attention_kernel
from tinyhun.kernels.cpu_math import JIT, exp_inplace

NH, NKV, D = 16, 8, 128
CHUNK_ROWS = 128
f32 = np.float32


# ---- the replaced kernel (8925476 kernels/cpu_attention.py), for the same-run comparison ----------------------

OLD_BLK = 32          # keys per block: the block's K and V rows (2 * 32 * d floats) stay in L1 across the group
OLD_CHUNK = 1 << 16   # multiply-adds per parallel chunk; a single chunk runs serially (cheaper than a launch)
OLD_MAX_CHUNKS = 256  # each chunk allocates its own small scratch


@njit(**JIT)
def _old_scores(s, qv, kc, h, j0, j1, scale):
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
def _old_accumulate(o, p, vc, h, j0, j1):
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
def _old_item(out, q, kc, vc, n, t, h, qs, sc, nb, mx, lsum):
    # one (row t, kv head h) over keys 0..n-1 of kc/vc[nkv, S, d]; scratch qs[group, d], sc[group, OLD_BLK],
    # nb int32[OLD_BLK], running max/sum mx/lsum[group]
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
    for j0 in range(0, n, OLD_BLK):
        j1 = min(j0 + OLD_BLK, n)
        nj = j1 - j0
        for g in range(group):
            s = sc[g]
            _old_scores(s, qs[g], kc, h, j0, j1, scale)
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
            _old_accumulate(out[t, h * group + g], s, vc, h, j0, j1)
    for g in range(group):
        o = out[t, h * group + g]
        inv = np.float32(1.0) / lsum[g]
        for i in range(d):
            o[i] *= inv


@njit(**JIT)
def _old_items(out, q, kc, vc, slots, positions, first, step, group):
    # items first, first+step, ... below T * nkv, item = t * nkv + h; allocates this run's small scratch
    nkv = kc.shape[1]
    d = q.shape[2]
    qs = np.empty((group, d), np.float32)
    sc = np.empty((group, OLD_BLK), np.float32)
    nb = np.empty(OLD_BLK, np.int32)
    mx = np.empty(group, np.float32)
    lsum = np.empty(group, np.float32)
    for it in range(first, q.shape[0] * nkv, step):
        t = it // nkv
        _old_item(out, q, kc[slots[t]], vc[slots[t]], positions[t] + 1, t, it - t * nkv, qs, sc, nb, mx, lsum)


@njit(parallel=True, **JIT)
def old_attention(out, q, k_cache, v_cache, slots, positions):
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
    nc = max(1, min(items, OLD_MAX_CHUNKS, nh * keys * d // OLD_CHUNK))
    if nc == 1:
        _old_items(out, q, k_cache, v_cache, slots, positions, 0, 1, group)
        return
    # rows at later positions attend to more keys: chunk c takes items c, c+nc, ... so chunks get equal work
    for c in prange(nc):
        _old_items(out, q, k_cache, v_cache, slots, positions, c, nc, group)



# ---- the benchmark -------------------------------------------------------------------------------------------

CLOCK = [time.perf_counter]   # time.thread_time with --threads 1


def best(fn, seconds):
    # best per-call seconds over batches of ~20 ms, for `seconds`
    clock = CLOCK[0]
    fn()
    n, t = 1, 0.0
    while t < 0.02:
        t0 = clock()
        for _ in range(n):
            fn()
        t = clock() - t0
        n *= 2
    n //= 2
    top, stop = t / n, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = clock()
        for _ in range(n):
            fn()
        top = min(top, (clock() - t0) / n)
    return top


def filled(kind, n, rng):
    # a pool holding positions 0..n-1 of one sequence (its blocks in order), its table, and the same keys and
    # values as a contiguous fp32 cache [1, nkv, n, d] for the old kernel
    nb = -(-n // kv.BLOCK)
    pool = kv.allocate(np.zeros, 1, nb, NKV, D, kind)[0]
    table = np.arange(nb, dtype=np.int32)[None]
    k, v = rng.standard_normal((n, NKV, D), dtype=f32), rng.standard_normal((n, NKV, D), dtype=f32)
    cpu.store_kv(pool, k, v, table, np.zeros(n, np.int64), np.arange(n))
    kc, vc = (np.ascontiguousarray(x.transpose(1, 0, 2))[None] for x in (k, v))
    return pool, table, kc, vc


def kv_bytes(kind, n):
    # bytes of keys and values (and int8 scales) one row reads over n positions
    return 2 * n * NKV * (D * np.dtype(kv.KINDS[kind]).itemsize + (4 if kind == "int8" else 0))


def decode_run(kind, n, rng, out, q):
    # a call of one kernel decoding the row at position n - 1, each call on the next of enough copies of the
    # cache that a cycle through them reads 2x L3
    slots, pos = np.zeros(1, np.int64), np.array([n - 1])
    pool, table, kc, vc = filled("fp32" if kind == "old" else kind, n, rng)
    if kind == "old":
        caches = itertools.cycle(cold_copies(lambda: (kc.copy(), vc.copy()), 2 * kc.nbytes))
        return lambda: old_attention(out, q, *next(caches), slots, pos)
    pools = itertools.cycle(cold_copies(lambda: kv.KVBlocks(*(x.copy() for x in pool)), kv_bytes(kind, n)))
    return lambda: attention_kernel(out, q, next(pools), table, slots, pos)


def decode(bw, depths, seconds, rng):
    print("decode, one row: us per layer, GB/s of KV read, % of read bandwidth (old: 8925476's fp32 kernel)")
    q, out = rng.standard_normal((1, NH, D), dtype=f32), np.empty((1, NH, D), f32)
    for n in depths:
        for kind in ("old", *kv.KINDS):
            t = best(decode_run(kind, n, rng, out, q), seconds)
            gbs = kv_bytes("fp32" if kind == "old" else kind, n) / t / 1e9
            share = 100 * gbs * 1e9 / bw.measure(1)
            print(f"  depth {n:6}  {kind:5} {t * 1e6:9.1f} us  {gbs:6.1f} GB/s  {share:5.1f} %")


def prefill(depths, prompts, seconds, rng):
    print(f"prefill: a {CHUNK_ROWS}-row chunk at a depth, and whole prompts in {CHUNK_ROWS}-row chunks: ms")
    q, out = rng.standard_normal((CHUNK_ROWS, NH, D), dtype=f32), np.empty((CHUNK_ROWS, NH, D), f32)
    slots = np.zeros(CHUNK_ROWS, np.int64)
    longest = max(max(depths) + CHUNK_ROWS, max(prompts))
    for kind in ("old", *kv.KINDS):
        pool, table, kc, vc = filled("fp32" if kind == "old" else kind, longest, rng)

        def chunk(p):
            rows = np.arange(p, p + CHUNK_ROWS)
            if kind == "old":
                return lambda: old_attention(out, q, kc, vc, slots, rows)
            return lambda: attention_kernel(out, q, pool, table, slots, rows)
        cells = [f"chunk@{p}: {best(chunk(p), seconds) * 1e3:7.1f}" for p in depths]
        for n in prompts:
            runs = [chunk(p) for p in range(0, n, CHUNK_ROWS)]
            cells.append(f"prompt {n}: {best(lambda: [r() for r in runs], seconds) * 1e3:7.1f}")   # noqa: B023
        print(f"  {kind:5} " + "  ".join(cells))


def main():
    quick = "--quick" in sys.argv
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    numba.set_num_threads(threads)
    if threads == 1:
        CLOCK[0] = time.thread_time
    rng = np.random.default_rng(0)
    bw = BestBandwidth()
    print(f"{threads} thread(s); read bandwidth {bw.measure() / 1e9:.1f} GB/s (all cores)")
    decode(bw, (4096, 16384), 0.3 if quick else 1.0, rng)
    prefill((0, 1024, 4096), (1024, 4096), 0.3 if quick else 1.0, rng)
    print(f"read bandwidth, best in this run: {bw.best / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
