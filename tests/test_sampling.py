"""Sampler vs transformers' logits processors (the oracle), plus draws, seeding and parameter validation."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tinyhun.errors import TinyhunError
from tinyhun.sampling import Sampler, SamplingParams, make_sampler

BIG_VOCAB = 120_000


def _top_p_ambiguous(scores: torch.Tensor, top_p: float) -> bool:
    """True if float rounding or the order of tied tokens could decide whether some token survives top-p."""
    w = np.exp(scores[0].double().numpy() - scores.max().item())  # [V], 0 where filtered
    w = np.sort(w[w > 0])
    thr, tol = top_p * w.sum(), 1e-6 * w.sum()  # HF's cumsum accumulates in double on CPU
    # Mass before a token in descending order: at least the strictly larger tokens, at most those plus its ties.
    above_strict = w.sum() - np.cumsum(w)[np.searchsorted(w, w, side="right") - 1]
    above_ties = w.sum() - np.cumsum(w)[np.searchsorted(w, w, side="left")]
    return bool(np.any((above_ties >= thr - tol) & (above_strict < thr + tol)))


def _min_p_ambiguous(scores: torch.Tensor, min_p: float) -> bool:
    r = np.exp(scores[0].double().numpy() - scores.max().item())
    return bool(np.any(np.abs(r - min_p) < 1e-5 * min_p))


def hf_probs(logits, history, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """The oracle: HF's processors in generate()'s order; None when the case sits on a rounding boundary."""
    scores = torch.from_numpy(logits.copy())[None]  # [1, V]
    ids = torch.tensor([list(history)], dtype=torch.long)
    if repetition_penalty != 1.0 and len(history):
        scores = RepetitionPenaltyLogitsProcessor(float(repetition_penalty))(ids, scores)
    if temperature == 0.0:
        out = np.zeros(logits.size, np.float32)
        out[np.argmax(scores[0].numpy())] = 1.0
        return out
    scores = TemperatureLogitsWarper(float(temperature))(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        if _top_p_ambiguous(scores, top_p):
            return None
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p > 0.0:
        if _min_p_ambiguous(scores, min_p):
            return None
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


def assert_same_distribution(ours, ref):
    np.testing.assert_array_equal(np.flatnonzero(ours), np.flatnonzero(ref), err_msg="surviving tokens differ")
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)


@st.composite
def cases(draw):
    vocab = draw(st.integers(1, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = rng.standard_normal(vocab) * draw(st.floats(0.1, 3.0))
    if draw(st.booleans()):  # coarse values give ties at the top-k / top-p boundaries
        logits = np.round(logits * 2) / 2
    # Ids up to vocab + 4: HF ignores ids past the logits (larger embedding vocab), and so must we.
    history = draw(st.lists(st.integers(0, vocab + 4), max_size=30))
    params = dict(
        temperature=draw(st.sampled_from([0.0, 0.7, 1.0, 2.5]) | st.floats(0.7, 3.0)),
        top_k=draw(st.sampled_from([0, 0, 1, 2, 5, 20, 250])),
        top_p=draw(st.sampled_from([1.0, 1.0, 0.9, 0.5, 0.1]) | st.floats(0.01, 1.0)),
        min_p=draw(st.sampled_from([0.0, 0.0, 0.05, 0.3]) | st.floats(0.0, 0.99)),
        repetition_penalty=draw(st.sampled_from([1.0, 1.05, 1.3, 3.0]) | st.floats(0.3, 3.0)),
    )
    return logits.astype(np.float32), history, params


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cases())
def test_probs_match_transformers(case):
    logits, history, params = case
    ref = hf_probs(logits, history, **params)
    assume(ref is not None)
    assert_same_distribution(make_sampler(**params).probs(logits, history), ref)


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_p=0.9),  # band pre-filter, no top-k
    dict(temperature=0.6, top_p=0.95, min_p=0.01),
    dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),  # Hunyuan's generation_config
    dict(temperature=1.3, min_p=0.1),
    dict(temperature=1.0),
])
def test_big_vocab_matches_transformers(params):
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(BIG_VOCAB) * 2.5).astype(np.float32)
    history = rng.integers(0, BIG_VOCAB, 500).tolist()
    ref = hf_probs(logits, history, **params)
    assert ref is not None, "fixture sits on a rounding boundary: pick another seed"
    assert_same_distribution(make_sampler(**params).probs(logits, history), ref)


def test_repetition_penalty_edge_ids():
    # Last id penalised, repeats penalised once, ids past the logits ignored; both signs of logit.
    logits = np.array([2.0, -1.0, 0.5, -3.0, 0.0, 1.5], np.float32)
    history = [0, 5, 5, 5, 3, 4, 6, 60]
    p = make_sampler(temperature=1.0, repetition_penalty=2.0).probs(logits, history)
    assert_same_distribution(p, hf_probs(logits, history, temperature=1.0, repetition_penalty=2.0))
    expected = np.exp([1.0, -1.0, 0.5, -6.0, 0.0, 0.75])
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-6)


def test_top_p_ties_keep_lowest_ids():
    # HF's order among tied tokens is whatever its sort gives; ours is fixed, like greedy's.
    p = make_sampler(temperature=1.0, top_p=0.45).probs(np.zeros(10, np.float32), [])
    np.testing.assert_allclose(p, [0.2] * 5 + [0.0] * 5, rtol=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**32 - 1), st.booleans(), st.sampled_from([1.0, 1.2, 5.0]))
def test_greedy_is_argmax_lowest_id_on_ties(vocab, seed, coarse, penalty):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(vocab).astype(np.float32)
    if coarse:
        logits = np.round(logits).astype(np.float32)
    history = rng.integers(0, vocab, 10).tolist()
    # top-k/top-p/min-p never drop the argmax, so greedy ignores them.
    sampler = make_sampler(top_k=3, top_p=0.5, min_p=0.2, repetition_penalty=penalty)
    expected = int(np.argmax(hf_probs(logits, history, repetition_penalty=penalty)))
    assert sampler(logits, history) == expected
    assert sampler(logits, history) == expected  # greedy is deterministic


def test_caller_logits_untouched_and_history_forms():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(1000).astype(np.float32)
    before = logits.copy()
    sampler = make_sampler(temperature=0.8, top_k=50, repetition_penalty=1.5, seed=3)
    history = [1, 2, 2, 999, 5000]
    p = sampler.probs(logits, history)
    np.testing.assert_array_equal(logits, before)
    for form in (tuple(history), np.array(history), np.array(history, np.int32)):
        np.testing.assert_array_equal(sampler.probs(logits, form), p)
    sampler(logits, history)
    np.testing.assert_array_equal(logits, before)
    assert p.dtype == np.float32 and p.shape == (1000,) and math.isclose(p.sum(), 1.0, rel_tol=1e-5)


def _draws(sampler, logits, n):
    return np.array([sampler(logits, []) for _ in range(n)])


def test_seed_reproducibility():
    logits = np.zeros(1000, np.float32)  # flat: 50 draws of 1000 tokens never repeat by chance
    a = _draws(make_sampler(temperature=1.0, seed=123), logits, 50)
    np.testing.assert_array_equal(a, _draws(make_sampler(temperature=1.0, seed=123), logits, 50))
    assert not np.array_equal(a, _draws(make_sampler(temperature=1.0, seed=124), logits, 50))
    free = [_draws(make_sampler(temperature=1.0), logits, 50) for _ in range(2)]
    assert not np.array_equal(*free)


def _assert_frequencies(counts, probs, n):
    """Pearson chi-square against probs with a loose bound (about 6 sigma above its mean)."""
    expected = probs * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = len(probs) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof) + 10, (chi2, dof)


def test_empirical_frequencies_match_probs():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(300) * 1.5).astype(np.float32)
    sampler = make_sampler(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, seed=11)
    p = sampler.probs(logits, [])
    n = 20_000
    counts = np.bincount(_draws(sampler, logits, n), minlength=300)
    assert not counts[p == 0].any(), "drew a filtered token"
    _assert_frequencies(counts[p > 0], p[p > 0], n)


def test_full_vocab_draw_spans_blocks_and_skips_zero_mass():
    # Heavy tokens in the first, a middle and the partial last block of the two-level draw; -inf logits
    # (zero mass) fill whole blocks and the tail, and must never be drawn.
    logits = np.full(BIG_VOCAB, -np.inf, np.float32)
    logits[:30_000] = -12.0
    heavy = np.array([0, 4095, 4096, 70_000, BIG_VOCAB - 2])
    logits[heavy] = [2.0, 1.0, 1.5, 0.5, 2.5]
    sampler = make_sampler(temperature=1.0, seed=99)
    p = sampler.probs(logits, []).astype(np.float64)
    n = 5_000
    got = _draws(sampler, logits, n)
    assert np.all(np.isfinite(logits[got]))
    counts = np.append(np.bincount(got, minlength=BIG_VOCAB)[heavy], np.isin(got, heavy, invert=True).sum())
    _assert_frequencies(counts, np.append(p[heavy], 1 - p[heavy].sum()), n)


GOOD = dict(temperature=[0, 0.0, 100, np.float32(0.5)], top_k=[0, 1, 10**6, np.int64(20)],
            top_p=[1, 1.0, 1e-9, 0.5], min_p=[0, 0.0, 0.999], repetition_penalty=[10, 1e-6, 1.0],
            seed=[None, 0, 2**63 - 1, np.uint32(7)], presence_penalty=[-2, 0, 2.0], frequency_penalty=[-2.0, 0.5, 2])
BAD = dict(temperature=[-0.1, 100.01, float("nan"), float("inf"), "1", True, None],
           top_k=[-1, 2.0, True, "3", None], top_p=[0, 0.0, 1.5, -0.1, float("nan"), None],
           min_p=[-0.01, 1, 1.0, float("nan")], repetition_penalty=[0, -1.0, 10.5, float("nan"), None],
           seed=[-1, 2**63, 1.5, "x", True], presence_penalty=[2.01, -3, float("nan"), None],
           frequency_penalty=[-2.5, 3, "1", True])


@pytest.mark.parametrize("name,value", [(k, v) for k, vs in GOOD.items() for v in vs])
def test_in_range_parameters_accepted(name, value):
    assert isinstance(make_sampler(**{name: value}), Sampler)


@pytest.mark.parametrize("name,value", [(k, v) for k, vs in BAD.items() for v in vs])
def test_out_of_range_parameters_raise(name, value):
    with pytest.raises(TinyhunError, match=rf"^{name}=.*: expected "):
        make_sampler(**{name: value})


def test_error_message_names_value_and_range():
    with pytest.raises(TinyhunError) as err:
        make_sampler(top_p=1.5)
    assert str(err.value) == "top_p=1.5: expected a number in (0, 1]"


def test_sampling_params_validated_once_and_frozen():
    """SamplingParams checks its fields as the sampler's keywords do; the sampler built from it holds them."""
    with pytest.raises(TinyhunError, match=r"^top_p=1.5: expected a number in \(0, 1\]$"):
        SamplingParams(top_p=1.5)
    p = SamplingParams(temperature=1, top_k=np.int64(5), seed=np.uint32(7))
    assert (p.temperature, p.top_k, p.seed) == (1.0, 5, 7) and type(p.temperature) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = 3
    s = Sampler(p)
    assert (s.temperature, s.top_k, s.top_p, s.seed, s.params) == (1.0, 5, 1.0, 7, p)


@given(st.lists(st.integers(0, 63), max_size=40), st.floats(-2, 2), st.floats(-2, 2), st.floats(0.2, 2))
@settings(max_examples=40, deadline=None)
def test_presence_and_frequency_penalties_follow_openai(history, presence, frequency, temperature):
    """logit[j] -= presence * [c_j > 0] + frequency * c_j, c_j the count of j in the history, before temperature."""
    logits = np.random.default_rng(len(history)).normal(size=64).astype(np.float32)
    counts = np.bincount(np.asarray(history, dtype=np.int64), minlength=64)
    want = (logits - presence * (counts > 0) - frequency * counts) / temperature
    want = np.exp(want - want.max())
    got = make_sampler(temperature=temperature, presence_penalty=presence, frequency_penalty=frequency)
    np.testing.assert_allclose(got.probs(logits, history), want / want.sum(), rtol=1e-4, atol=1e-7)
    greedy = make_sampler(presence_penalty=presence, frequency_penalty=frequency)
    assert greedy(logits, history) == int(np.argmax((logits - presence * (counts > 0) - frequency * counts)
                                                    .astype(np.float32)))
