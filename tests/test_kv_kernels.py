"""The Numba paged-KV kernels (tinyhun.kernels.cpu store_kv / attention_rows) equal kernels/kv.py's references.

Stores are compared byte for byte (values and int8 scales) for fp32, fp16 and int8 storage; attention within fp32
round-off relative to the largest value summed (the kernel reassociates sums and has its own exp), the same
RTOL as the other kernels' tests. Positions never written hold NaN, so a kernel that reads one fails.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from tinyhun.kernels import cpu, kv, ref
from tinyhun.kernels.cpu_math import JIT

RTOL = 1e-5
SETTINGS = settings(max_examples=25, deadline=None)
KINDS = list(kv.KINDS)
f32 = np.float32


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(f32)


def blocks(kind, nb, nkv, bs, d):
    # a pool whose every unwritten value reads as NaN (int8: its scale)
    dt = kv.KINDS[kind]
    fill = {"fp32": np.nan, "fp16": np.float16(np.nan).view(np.uint16), "int8": 0}[kind]
    k, v = np.full((nb, nkv, bs, d), fill, dt), np.full((nb, nkv, bs, d), fill, dt)
    ss = (nb, nkv, bs) if kind == "int8" else (0, 0, 0)
    return kv.KVBlocks(k, v, np.full(ss, np.nan, f32), np.full(ss, np.nan, f32))


def copy(b):
    return kv.KVBlocks(*(x.copy() for x in b))


def assert_same_bits(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


def close(got, want, scale, rtol=RTOL):
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= rtol * scale + 1e-30), f"max err {err.max():.3g} vs scale {np.max(scale):.3g}"


def rows_of(chunks):
    # [(slot, first position, count)] -> slots, positions int64[T]
    slots = np.concatenate([np.full(n, s) for s, _, n in chunks]).astype(np.int64)
    positions = np.concatenate([np.arange(p, p + n) for _, p, n in chunks]).astype(np.int64)
    return slots, positions


class Case:
    """Sequences with ragged histories in one pool (sequence 1 sharing sequence 0's first full blocks when asked),
    their histories stored, and a step's new rows (a chunk per sequence) still to store and attend."""

    def __init__(self, rng, kind, bs, nkv, group, d, lengths, new, shared, shuffle):
        nseq = len(lengths)
        own = [-(-(n + m) // bs) for n, m in zip(lengths, new)]
        nb = sum(own) + 2
        perm = rng.permutation(nb).astype(np.int32)
        self.tables = np.full((nseq + 1, max(own) + 2), -1, np.int32)   # a spare row and spare columns, unused
        at = 0
        for s in range(nseq):
            self.tables[s, :own[s]] = perm[at:at + own[s]]
            at += own[s]
        share = min(shared, lengths[0] // bs, lengths[1] // bs if nseq > 1 else 0, own[0])
        if nseq > 1 and share:
            self.tables[1, :share] = self.tables[0, :share]   # the same blocks: one prefix stored once
        self.pool = blocks(kind, nb, nkv, bs, d)
        hist = [(s, share * bs if (s == 1 and share) else 0, n - (share * bs if (s == 1 and share) else 0))
                for s, n in enumerate(lengths)]
        hs, hp = rows_of(hist)
        kv.store_kv(self.pool, rand(rng, len(hs), nkv, d, scale=3.0), rand(rng, len(hs), nkv, d), self.tables,
                    hs, hp)
        self.slots, self.positions = rows_of([(s, n, m) for s, (n, m) in enumerate(zip(lengths, new))])
        if shuffle:
            order = rng.permutation(len(self.slots))
            self.slots, self.positions = self.slots[order], self.positions[order]
        T = len(self.slots)
        self.k, self.v = rand(rng, T, nkv, d, scale=3.0), rand(rng, T, nkv, d)
        self.q = rand(rng, T, nkv * group, d, scale=2.0)

    def store(self, impl, pool):
        return impl.store_kv(pool, self.k, self.v, self.tables, self.slots, self.positions)

    def attend(self, impl, pool, out=None):
        out = np.full_like(self.q, np.nan) if out is None else out
        return impl.attention_rows(out, self.q, pool, self.tables, self.slots, self.positions)

    def check(self):
        want_pool, got_pool = copy(self.pool), copy(self.pool)
        kv.store_kv(want_pool, self.k, self.v, self.tables, self.slots, self.positions)
        assert cpu.store_kv(got_pool, self.k, self.v, self.tables, self.slots, self.positions) is got_pool
        assert_same_bits(got_pool, want_pool)
        want = self.attend(kv, want_pool)
        got = self.attend(cpu, got_pool)
        vmax = max(np.abs(kv.gather(want_pool, self.tables[s], int(self.positions[self.slots == s].max()) + 1)[1])
                   .max() for s in np.unique(self.slots))
        close(got, want, vmax)
        return got_pool, got


@SETTINGS
@given(kind=st.sampled_from(KINDS), bs=st.sampled_from([1, 2, 5, 16, 32]), nkv=st.sampled_from([1, 2, 3]),
       group=st.sampled_from([1, 2, 4]), d=st.sampled_from([8, 16, 64, 128]),
       lengths=st.lists(st.integers(0, 150), min_size=1, max_size=3), new=st.integers(1, 40),
       shared=st.integers(0, 3), shuffle=st.booleans(), seed=st.integers(0, 2**16))
def test_store_and_attention_equal_reference(kind, bs, nkv, group, d, lengths, new, shared, shuffle, seed):
    rng = np.random.default_rng(seed)
    news = [new if s == 0 else 1 + (new * 7 + s) % 5 for s in range(len(lengths))]   # a chunk and decode rows
    Case(rng, kind, bs, nkv, group, d, lengths, news, shared, shuffle).check()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lengths,new,nkv", [([2047], [1], 8), ([3000], [1], 1), ([0], [70], 8), ([100], [33], 8),
                                             ([2000], [3], 1), ([900, 40, 1500], [1, 1, 1], 2)])
def test_parallel_paths(kind, lengths, new, nkv):
    # shapes that take the parallel path: long decode rows split along the keys and merged, prefill chunks
    rng = np.random.default_rng(len(lengths) + sum(lengths))
    Case(rng, kind, 32, nkv, 2, 128 if nkv == 8 else 64, lengths, new, 0, False).check()


def test_shared_prefix_blocks_are_read_by_both():
    # two tables point at the same full blocks: attention through either sees the same prefix
    rng = np.random.default_rng(3)
    c = Case(rng, "fp16", 4, 2, 2, 16, [20, 24], [1, 1], 3, False)
    assert np.array_equal(c.tables[0, :3], c.tables[1, :3])
    c.check()


def test_rows_of_several_sequences_each_as_alone():
    # a batch step (rows of three sequences, interleaved) equals each row attended alone; each row's k and v sit
    # where its table says
    rng = np.random.default_rng(7)
    c = Case(rng, "fp32", 8, 2, 2, 16, [5, 39, 0], [2, 1, 3], 1, True)
    pool, got = c.check()
    for t in range(len(c.q)):
        alone = cpu.attention_rows(np.empty_like(c.q[t:t + 1]), c.q[t:t + 1], pool, c.tables, c.slots[t:t + 1],
                                   c.positions[t:t + 1])
        close(got[t:t + 1], alone, 8.0)
        s, p = c.slots[t], c.positions[t]
        keys, values = kv.gather(pool, c.tables[s], p + 1)
        assert np.array_equal(keys[:, p], c.k[t]) and np.array_equal(values[:, p], c.v[t])


def test_out_may_alias_q():
    rng = np.random.default_rng(0)
    c = Case(rng, "fp32", 8, 2, 2, 16, [5, 30], [20, 1], 0, False)
    pool = c.store(kv, copy(c.pool))
    want = c.attend(kv, pool)
    c.attend(cpu, pool, out=c.q)
    close(c.q, want, 3.0 * 8)


def test_fp16_and_int8_conversion_edges():
    # round to nearest even, overflow to inf, subnormals, inf and nan (fp16); zero rows and huge/tiny rows (int8)
    vals = np.array([0, -0.0, 1, 65504, 65519, 65520, 1e6, -np.inf, np.inf, np.nan, 6e-8, 3e-8, 2.9e-8, 1e-10,
                     6.1e-5, 6.09e-5, 1 + 2**-11, 1 + 3 * 2**-11, -2.5, 1e-30, 1e30, -1e-38], f32)
    rng = np.random.default_rng(5)
    x = np.concatenate([vals, rng.standard_normal(1002).astype(f32) * f32(10.0) ** rng.integers(-9, 6, 1002)])
    x = x.astype(f32).reshape(-1, 1, 16)   # fp32, as the engine stores (10.0 ** ints above is float64)
    x[-1] = 0.0                                                      # an all-zero row: int8 scale 0
    T = len(x)
    tables, slots, positions = np.arange(T, dtype=np.int32)[None], np.zeros(T, np.int64), np.arange(T) * 2
    for kind in ("fp16", "int8"):
        xs = x if kind == "fp16" else np.nan_to_num(x, nan=0.0, posinf=1e30, neginf=-1e30)
        want, got = blocks(kind, T, 1, 2, 16), blocks(kind, T, 1, 2, 16)
        with np.errstate(all="ignore"):
            kv.store_kv(want, xs, -xs, tables, slots, positions)
        cpu.store_kv(got, xs, -xs, tables, slots, positions)
        assert_same_bits(got, want)
    assert np.all(got.k_scale[-1, 0, 0] == 0) and np.all(got.k[-1, 0, 0] == 0)


@njit(**JIT)
def _layer_ops(out, q, pool, k, v, tables, slots, positions):
    # as tinyhun.blocks calls them: the reference names compile to the Numba kernels, inside fastmath code
    ref.store_kv(pool, k, v, tables, slots, positions)
    ref.attention_rows(out, q, pool, tables, slots, positions)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_names_compile_to_the_kernels(kind):
    c = Case(np.random.default_rng(11), kind, 8, 2, 2, 16, [40, 9], [12, 1], 1, False)
    want_pool, got_pool = copy(c.pool), copy(c.pool)
    want = c.attend(kv, c.store(kv, want_pool))
    got = np.full_like(c.q, np.nan)
    _layer_ops(got, c.q, got_pool, c.k, c.v, c.tables, c.slots, c.positions)
    assert_same_bits(got_pool, want_pool)
    close(got, want, 8.0)


def test_bad_rows_are_one_line_errors():
    c = Case(np.random.default_rng(2), "int8", 4, 2, 2, 16, [10, 6], [1, 1], 0, False)
    nb = c.pool.k.shape[0]
    negative = c.tables.copy()
    negative[1, 1] = -3   # the block row 1 (position 6) writes and reads
    bad = [("slots", {"slots": np.array([0, len(c.tables)])}),                         # past the table rows
           ("positions", {"positions": np.array([c.tables.shape[1] * 4, 6])}),       # past the table
           ("tables", {"tables": np.where(c.tables == c.tables[0, 2], nb, c.tables)}),   # a block past the pool
           ("tables", {"tables": negative})]
    for name, change in bad:
        args = {"tables": c.tables, "slots": c.slots, "positions": c.positions, **change}
        for op, first in ((cpu.store_kv, (copy(c.pool), c.k, c.v)), (cpu.attention_rows,
                                                                     (np.empty_like(c.q), c.q, c.pool))):
            with pytest.raises(ValueError) as e:
                op(*first, **args)
            assert str(e.value).startswith(name) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="^slots"):
        cpu.attention_rows(np.empty_like(c.q), c.q, c.pool, c.tables, c.slots[:1], c.positions)
    with pytest.raises(ValueError, match="^q, out"):
        cpu.attention_rows(np.empty_like(c.q[:, :3]), c.q[:, :3], c.pool, c.tables, c.slots, c.positions)
    with pytest.raises(ValueError, match="^k, v"):
        cpu.store_kv(copy(c.pool), c.k[:, :1], c.v[:, :1], c.tables, c.slots, c.positions)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=300))
def test_units_by_falling_cost_equal_numpys_stable_argsort(costs):
    """The attention planner's order of work units (a hand-written merge sort: Numba's argsort compiles slowly):
    largest cost first, ties in index order, as NumPy's stable argsort of -cost."""
    from tinyhun.kernels.cpu_attention import _by_falling_cost
    cost = np.array(costs, np.int64)
    np.testing.assert_array_equal(_by_falling_cost(cost), np.argsort(-cost, kind="mergesort"))
