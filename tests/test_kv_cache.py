"""The KV cache object (trim, prefix reuse), batched decode, per-token generation results, id validation."""
import numpy as np
import pytest

import tinyhun
from oracle import ROOT
from tinyhun.errors import TinyhunError
from tinyhun.generation import generate_step
from tinyhun.sampling import make_sampler

TINY = ROOT / "weights" / "tiny-hunyuan"


@pytest.fixture(scope="module", params=["numba", "numpy"])
def model(request):
    return tinyhun.load(TINY, kernels=request.param)


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    from tinyhun.quantize import quantize_model
    return tinyhun.load(quantize_model(TINY, tmp_path_factory.mktemp("q") / "q4", progress=False))


def greedy_batch(model, prompts, steps):
    """Each prompt prefilled into its own cache of one pool, then `steps` greedy tokens decoded for all at once."""
    caches = model.new_caches(len(prompts), 64)
    tokens = [int(np.argmax(model.forward(c, p)[0])) for c, p in zip(caches, prompts)]
    out = [[t] for t in tokens]
    for _ in range(steps - 1):
        logits = model.forward_batch(caches, tokens)
        tokens = [int(t) for t in np.argmax(logits, axis=-1)]
        for o, t in zip(out, tokens):
            o.append(t)
    return out, caches


@pytest.mark.parametrize("n", [1, 3, 5])
def test_batched_decode_equals_one_stream_each(model, n):
    rng = np.random.default_rng(n)
    prompts = [list(rng.integers(0, 400, size=k)) for k in (3, 9, 1, 14, 6)[:n]]
    batched, caches = greedy_batch(model, prompts, 10)
    for p, got, cache in zip(prompts, batched, caches):
        assert got == list(generate_step(model, p, make_sampler(), 10))
        assert len(cache) == len(p) + 9
        # the batched cache holds what a single stream's forward would: the next logits agree
        alone = model.logits(p + got)[-1]
        np.testing.assert_allclose(model.forward(cache, got[-1:])[0], alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_batched_int4_decode_equals_one_stream_each(int4):
    prompts = [[5, 6, 7], [100, 3], [9, 9, 9, 9, 42]]
    batched, _ = greedy_batch(int4, prompts, 8)
    assert batched == [list(generate_step(int4, p, make_sampler(), 8)) for p in prompts]


def test_forward_batch_rejects_foreign_or_repeated_caches(model):
    a, b = model.new_caches(2, 8)
    other = tinyhun.load(TINY, kernels="numpy").new_cache(8)   # another model's pool
    with pytest.raises(TinyhunError, match="another model"):
        model.forward_batch([a, other], [1, 2])
    with pytest.raises(TinyhunError, match="distinct"):
        model.forward_batch([a, a], [1, 2])
    with pytest.raises(TinyhunError, match="one token per cache"):
        model.forward_batch([a, b], [1])


def test_trim_and_prefix_reuse(model):
    ids = list(range(10, 30))
    cache = model.new_cache(64)
    model.forward(cache, ids)
    assert cache.tokens == ids
    assert cache.reuse(ids[:12] + [1, 2]) == 12 and len(cache) == 12
    cache.trim(5)
    assert len(cache) == 5
    with pytest.raises(TinyhunError, match="trim"):
        cache.trim(6)
    # what follows a trim is computed afresh: logits equal a fresh cache's
    got = model.forward(cache, ids[5:])[0]
    want = model.logits(ids)[-1]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_a_conversation_reuses_its_prefix(model):
    cache = model.new_cache(256)
    first = list(tinyhun.stream_generate(model, "Hello world", max_tokens=6, chat=False, cache=cache))
    assert first[-1].cached_tokens == 0 and first[-1].finish_reason == "length"
    text = "Hello world" + "".join(s.text for s in first) + " and more"
    again = list(tinyhun.stream_generate(model, text, max_tokens=6, chat=False, cache=cache))
    fresh = list(tinyhun.stream_generate(model, text, max_tokens=6, chat=False))
    assert again[0].cached_tokens > first[0].prompt_tokens // 2
    assert [s.token for s in again] == [s.token for s in fresh]


def test_steps_carry_counts_logprobs_and_finish(model):
    steps = list(tinyhun.stream_generate(model, "The quick brown fox", max_tokens=5, chat=False, logprobs=True))
    assert [s.completion_tokens for s in steps] == [1, 2, 3, 4, 5]
    assert [s.finish_reason for s in steps] == [None] * 4 + ["length"]
    ids = model.tokenizer.encode("The quick brown fox")
    assert all(s.prompt_tokens == len(ids) for s in steps)
    logits = model.logits(ids + [s.token for s in steps[:-1]])[len(ids) - 1:].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    np.testing.assert_allclose([s.logprob for s in steps], logp[np.arange(5), [s.token for s in steps]], atol=1e-4)
    assert "".join(s.text for s in steps) == "".join(tinyhun.generate(model, "The quick brown fox", max_tokens=5,
                                                                      chat=False))
    text = "".join(s.text for s in steps)
    cut = list(tinyhun.stream_generate(model, "The quick brown fox", max_tokens=5, chat=False, stop=text[2:4]))
    assert cut[-1].finish_reason == "stop" and "".join(s.text for s in cut) == text[:2]


@pytest.mark.parametrize("ids, match", [
    ([1.5, 2.0], "sequence of integers"), ([[1, 2], [3, 4]], "1-D"), ([2 ** 70], "beyond int64"),
    ([], "non-empty"), ([1, -1], "out of range"), ([True, False], "sequence of integers"),
])
def test_bad_token_ids_are_clear_errors(model, ids, match):
    with pytest.raises(TinyhunError, match=match):
        model.logits(ids)


def test_ids_past_the_context_are_refused(model):
    with pytest.raises(TinyhunError, match="exceed the model's context of 4096"):
        model.logits(np.ones(5000, np.int64))
    with pytest.raises(TinyhunError, match="max_context"):
        model.new_cache(5000)


def test_model_is_immutable(model):
    with pytest.raises(AttributeError, match="immutable"):
        model.tokenizer = None
