"""Text generation on the tiny checkpoint: stop tokens and strings, limits, streaming, parameter errors."""
import numpy as np
import pytest

import tinyhun
from oracle import ROOT
from tinyhun.errors import TinyhunError
from tinyhun.generation import generate_step, held_back, token_steps
from tinyhun.sampling import SamplingParams, make_sampler

TINY = ROOT / "weights" / "tiny-hunyuan"


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY)


def full_text(model, **kw):
    return "".join(tinyhun.generate(model, "The quick brown fox", chat=False, **kw))


def test_text_is_the_decoded_greedy_ids(model):
    ids = model.tokenizer.encode("The quick brown fox")
    tokens = list(generate_step(model, ids, make_sampler(), 24))
    stop = next((i for i, t in enumerate(tokens) if t in model.tokenizer.stop_ids), len(tokens))
    assert full_text(model, max_tokens=24) == model.tokenizer.decode(tokens[:stop])


def test_greedy_picked_by_the_model_equals_argmax_of_its_logits(model):
    """generate_step lets the model pick greedy tokens (Model.forward argmax=True: on a GPU only the id comes
    down); the tokens equal the argmax of the logits token_steps yields, and a repetition penalty (not greedy on
    the raw logits) keeps the logits path."""
    ids = model.tokenizer.encode("The quick brown fox")
    steps = list((t, None if lg is None else lg.copy()) for t, lg, _ in token_steps(model, ids, make_sampler(), 12))
    assert [t for t, _ in steps] == list(generate_step(model, ids, make_sampler(), 12))
    assert all(lg is None for _, lg, _ in token_steps(model, ids, make_sampler(), 3, logits=False))   # the first too
    assert all(t == int(np.argmax(lg)) for t, lg in steps)
    penalised = make_sampler(repetition_penalty=1.3)
    assert not penalised.greedy and make_sampler().greedy
    assert all(lg is not None for _, lg, _ in token_steps(model, ids, penalised, 4, logits=False))
    cache = model.new_cache(8)
    with pytest.raises(TinyhunError, match="argmax=True returns a token"):
        model.forward(cache, [1, 2], out=np.zeros((2, model.config.vocab_size), np.float32), argmax=True)
    assert model.forward(cache, [1, 2], argmax=True) == int(np.argmax(model.logits([1, 2])[-1]))
    a, b = model.new_caches(2, 8)
    model.forward(a, [5, 6, 7])
    model.forward(b, [9])
    want = model.forward_batch([a, b], [3, 4]).copy()
    a.trim(3)
    b.trim(1)
    assert list(model.forward_batch([a, b], [3, 4], argmax=True)) == list(np.argmax(want, axis=1))


def test_stop_string_is_cut_and_not_emitted(model):
    text = full_text(model, max_tokens=32)
    assert len(text) > 6
    stop = text[4:7]
    cut = full_text(model, max_tokens=32, stop=[stop])
    assert cut == text[:text.find(stop)]
    assert held_back("abc", ["cde", "bcx"]) == 2 and held_back("abc", ["x"]) == 0


def test_stops_at_stop_token(model, monkeypatch):
    eot = min(model.tokenizer.stop_ids)
    letter = model.tokenizer.encode("a", add_special_tokens=False)[0]

    class Forced:      # says "a" twice, then the end-of-turn token, then "a" again
        n = 0

        def __call__(self, logits, history):
            self.n += 1
            return eot if self.n == 3 else letter

    monkeypatch.setattr("tinyhun.generation.make_sampler", lambda **kw: Forced())
    assert full_text(model, max_tokens=6) == "aa"


def test_seeded_sampling_is_reproducible(model):
    a = full_text(model, max_tokens=16, temperature=0.9, top_k=50, seed=7)
    b = full_text(model, max_tokens=16, temperature=0.9, top_k=50, seed=7)
    assert a == b


def test_chinese_streams_as_valid_utf8(model):
    for piece in tinyhun.generate(model, "你好，世界", chat=False, max_tokens=32, temperature=1.0, seed=3):
        piece.encode("utf-8")       # strict: raises on a lone surrogate


def test_context_overflow_is_a_clear_error(model):
    with pytest.raises(TinyhunError, match="exceeds the model's context of 4096"):
        list(tinyhun.generate(model, "Hello", max_tokens=5000))
    state = model.new_cache(4)
    with pytest.raises(TinyhunError, match="context full"):
        model.forward(state, np.arange(5))


@pytest.mark.parametrize("kw, match", [
    (dict(max_tokens=0), "max_tokens=0"), (dict(top_p=0.0), "top_p=0.0"), (dict(temperature=-1), "temperature=-1"),
    (dict(top_k=-2), "top_k=-2"), (dict(min_p=1.5), "min_p=1.5"), (dict(repetition_penalty=0), "repetition_penalty=0"),
])
def test_bad_parameters_name_the_parameter(model, kw, match):
    with pytest.raises(TinyhunError, match=match):
        list(tinyhun.generate(model, "Hello", **kw))


def test_token_ids_out_of_range(model):
    with pytest.raises(TinyhunError, match="token id out of range"):
        model.logits([1, 2, 10_000])


def test_top_logprobs_rank_the_distribution(model):
    ids = model.tokenizer.encode("The quick brown fox")
    steps = list(tinyhun.stream_generate(model, "The quick brown fox", chat=False, max_tokens=4, top_logprobs=3))
    logits = model.logits(ids + [s.token for s in steps[:-1]]).astype(np.float64)[len(ids) - 1:]
    for s, row in zip(steps, logits):
        ref = row - row.max() - np.log(np.exp(row - row.max()).sum())
        want = sorted(range(len(row)), key=lambda i: (-ref[i], i))[:3]
        assert [i for i, _ in s.top_logprobs] == want
        np.testing.assert_allclose([lp for _, lp in s.top_logprobs], ref[want], atol=1e-4)
        assert s.logprob == pytest.approx(ref[s.token], abs=1e-4) and s.token == want[0]   # greedy


def test_sampling_params_in_place_of_the_keywords(model):
    """generate takes one SamplingParams (what chat, the CLI and the server pass) or its fields as keywords."""
    kw = dict(temperature=0.8, top_k=5, seed=3, max_tokens=12)
    params = SamplingParams(temperature=0.8, top_k=5, seed=3)
    assert full_text(model, sampling=params, max_tokens=12) == full_text(model, **kw)
    with pytest.raises(TinyhunError, match="not both"):
        full_text(model, sampling=params, temperature=0.5)
    with pytest.raises(TinyhunError, match="^sampling=.*: expected a tinyhun.sampling.SamplingParams$"):
        full_text(model, sampling={"temperature": 0.5})
