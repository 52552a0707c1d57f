"""Mixture-of-experts ops: the Numba kernels (kernels/moe_cpu.py) against their NumPy references (kernels/moe.py),
and the references against the definition (softmax, top-k, renormalise; a weighted sum of expert MLPs)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyhun.errors import TinyhunError
from tinyhun.kernels import cpu, moe, moe_cpu, q4, q8  # noqa: F401  (cpu registers the ops the MoE kernels call)
from tinyhun.kernels.linear import act_scratch, as_linear

f32 = np.float32
FORMATS = {"f32": lambda w: w, "q4": lambda w: q4.quantize_q4(w, 32), "q4-asym": lambda w: q4.quantize_q4(w, 32, False),
           "q8": q8.quantize_q8}
IMPLS = {"ref": moe, "numba": moe_cpu}


def make_experts(rng, E, H, Ie, fmt, poison=()):
    """Stacked gate/up/down linears of E random experts; experts in `poison` hold NaN weights (f32 only)."""
    def mats(n, k):
        ws = [(rng.standard_normal((n, k)) * 0.2).astype(f32) for _ in range(E)]
        for e in poison:
            ws[e][:] = np.nan
        return moe.stack_linears([as_linear(FORMATS[fmt](w)) for w in ws])
    return mats(Ie, H), mats(Ie, H), mats(H, Ie)


def route_ref(x, router, k):
    T, E = len(x), len(router)
    ids, w, probs = np.zeros(T * k, np.int64), np.zeros(T * k, f32), np.zeros(T * E, f32)
    moe.route(ids, w, probs, x, router)
    return ids, w, probs


def run_experts(impl, x, ids, w, experts, Ie):
    """out = impl's prefill (T > 1) or decode (T = 1) of x, with its scratch allocated here."""
    T, H = x.shape
    k = ids.size // T
    out = np.zeros((T, H), f32)
    g, u = np.zeros(max(T, k) * Ie, f32), np.zeros(max(T, k) * Ie, f32)   # decode: each of the k experts its own
    acts = act_scratch(max(T, k), 32 * -(-max(H, Ie) // 32))
    if T == 1:
        impl.moe_decode(out, x, ids, w, *experts, g, u, np.zeros(k * H, f32), acts)
    else:
        E = experts[0][0].shape[0]
        impl.moe_prefill(out, x, ids, w, *experts, np.zeros(T * k, np.int64), np.zeros(E + 1, np.int64),
                         np.zeros(T * H, f32), g[:T * Ie], u[:T * Ie], np.zeros(T * H, f32), acts)
    return out


def dense_definition(x, ids, w, experts):
    """sum_j w_j * down_e(silu(gate_e x) * up_e x), each expert's fp32 weights read back from the stack."""
    gate, up, down = (s.w for s in experts)
    T, k = len(x), ids.size // len(x)
    out = np.zeros_like(x, dtype=np.float64)
    for t in range(T):
        for j in range(k):
            e = ids[t * k + j]
            a, b = gate[e] @ x[t], up[e] @ x[t]
            out[t] += w[t * k + j] * (down[e] @ (a / (1 + np.exp(-a)) * b))
    return out


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 9), E=st.integers(1, 12), kk=st.integers(1, 12), H=st.integers(1, 40),
       seed=st.integers(0, 2**16), ties=st.booleans())
def test_route_matches_definition_and_reference(T, E, kk, H, seed, ties):
    # small integers and quarters: every logit is exact in fp32 whatever the summation order, so both versions
    # see the same logits; `ties` duplicates router rows so equal probabilities must go to the lower index
    k = min(kk, E)
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(T, H)).astype(f32)
    router = (rng.integers(-4, 5, size=(E, H)) / 4).astype(f32)
    if ties:
        router[rng.integers(0, E, size=E)] = router[rng.integers(0, E, size=E)]
    ids, w, probs = route_ref(x, router, k)
    logits = x.astype(np.float64) @ router.T.astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs.reshape(T, E), p, rtol=1e-5, atol=1e-7)
    want = np.array([sorted(range(E), key=lambda e: (-logits[t, e], e))[:k] for t in range(T)])
    np.testing.assert_array_equal(ids.reshape(T, k), want)   # exact logits: ties broken by the lowest index
    np.testing.assert_allclose(w.reshape(T, k), np.take_along_axis(p, want, 1) / np.take_along_axis(p, want, 1).sum(
        axis=1, keepdims=True), rtol=1e-5)
    got = [np.zeros(T * k, np.int64), np.zeros(T * k, f32), np.zeros(T * E, f32)]
    moe_cpu.route(*got, x, router)
    np.testing.assert_array_equal(got[0], ids)
    np.testing.assert_allclose(got[1], w, rtol=1e-6)
    np.testing.assert_allclose(got[2], probs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_route_equal_probabilities_and_huge_logits(impl):
    x = np.ones((2, 8), f32)
    ids, w, probs = np.zeros(6, np.int64), np.zeros(6, f32), np.zeros(10, f32)
    IMPLS[impl].route(ids, w, probs, x, np.zeros((5, 8), f32))           # all experts tie
    np.testing.assert_array_equal(ids, [0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(w, 1 / 3, rtol=1e-6)
    router = np.array([[1e4] * 8, [-1e4] * 8, [1e4 - 1] * 8, [0] * 8, [1e4] * 8], f32)
    IMPLS[impl].route(ids, w, probs, x, router)   # logits 8e4: exp overflows unless the max is subtracted first
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(probs))
    np.testing.assert_array_equal(ids, [0, 4, 2, 0, 4, 2])
    top = np.array([1, 1, np.exp(-8.0)]) / (2 + np.exp(-8.0))
    np.testing.assert_allclose(w, np.tile(top, 2), rtol=1e-5)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (1, 16, 8), (7, 4, 2), (13, 16, 3), (40, 8, 8), (64, 64, 8)])
def test_experts_kernel_matches_reference(fmt, T, E, k):
    rng = np.random.default_rng(T * 100 + E + k)
    H, Ie = 64, 96
    experts = make_experts(rng, E, H, Ie, fmt)
    x = rng.standard_normal((T, H)).astype(f32)
    ids, w, _ = route_ref(x, rng.standard_normal((E, H)).astype(f32), k)
    want = run_experts(moe, x, ids, w, experts, Ie)
    got = run_experts(moe_cpu, x, ids, w, experts, Ie)
    rtol = 1e-5 if fmt == "f32" else 1e-4   # int8 activations: a rounding flip moves a value by one step
    assert np.abs(got - want).max() <= rtol * np.abs(want).max()
    if fmt == "f32":
        np.testing.assert_allclose(want, dense_definition(x, ids, w, experts), rtol=0,
                                   atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("H,Ie,k", [(40, 24, 3), (17, 33, 5)])
def test_decode_partial_tiles(H, Ie, k):
    # decode's parallel items are 16-row tiles of every picked expert: widths that leave a last, partial tile
    rng = np.random.default_rng(H + Ie)
    E = 7
    experts = make_experts(rng, E, H, Ie, "f32")
    x = rng.standard_normal((1, H)).astype(f32)
    ids, w, _ = route_ref(x, rng.standard_normal((E, H)).astype(f32), k)
    want = run_experts(moe, x, ids, w, experts, Ie)
    np.testing.assert_allclose(run_experts(moe_cpu, x, ids, w, experts, Ie), want, rtol=0,
                               atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_equals_prefill_row_by_row(impl):
    rng = np.random.default_rng(5)
    E, H, Ie, k, T = 8, 32, 64, 2, 6
    experts = make_experts(rng, E, H, Ie, "f32")
    x = rng.standard_normal((T, H)).astype(f32)
    ids, w, _ = route_ref(x, rng.standard_normal((E, H)).astype(f32), k)
    full = run_experts(IMPLS[impl], x, ids, w, experts, Ie)
    for t in range(T):
        row = run_experts(IMPLS[impl], x[t:t + 1], ids[t * k:(t + 1) * k], w[t * k:(t + 1) * k], experts, Ie)
        np.testing.assert_allclose(row[0], full[t], rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 5])
def test_unpicked_experts_are_never_read(impl, T):
    # experts no row is routed to hold NaN: a single read of them would poison the output
    rng = np.random.default_rng(T)
    E, H, Ie, k = 8, 32, 48, 2
    router = np.zeros((E, H), f32)
    router[[1, 6]] = 1.0                      # x > 0: experts 1 and 6 win every row
    x = np.abs(rng.standard_normal((T, H))).astype(f32) + 0.1
    ids, w, _ = route_ref(x, router, k)
    assert set(ids) == {1, 6}
    experts = make_experts(rng, E, H, Ie, "f32", poison=[0, 2, 3, 4, 5, 7])
    out = run_experts(IMPLS[impl], x, ids, w, experts, Ie)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("impl", IMPLS)
def test_count_experts(impl):
    ids = np.array([3, 0, 3, 2, 3, 0], np.int64)
    load = np.array([1, 0, 0, 0, 0], np.int64)
    IMPLS[impl].count_experts(load, ids)
    np.testing.assert_array_equal(load, [3, 0, 1, 3, 0])


def test_stack_linears_keeps_shared_fields_and_refuses_mixed_formats():
    rng = np.random.default_rng(0)
    ws = [as_linear(q4.quantize_q4(rng.standard_normal((16, 64)).astype(f32), 32)) for _ in range(3)]
    s = moe.stack_linears(ws)
    assert s.packed.shape == (3,) + ws[0].packed.shape and s.mins is s.scales   # symmetric: mins never stored
    np.testing.assert_array_equal(moe.expert(s, 2).packed, ws[2].packed)
    with pytest.raises(TinyhunError, match="one weight format"):
        moe.stack_linears([ws[0], as_linear(rng.standard_normal((16, 64)).astype(f32))])
