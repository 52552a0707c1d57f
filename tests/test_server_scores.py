"""Scores on `tinyhun serve`: streamed chat logprobs sent with their tokens' text (however generation, the
thinking split or the content filter holds it back), and /v1/completions scoring a prompt without generating
(echo with max_tokens 0)."""
import json

import openai
import pytest

import tinyhun
from live_server import LiveServer
from oracle import ROOT
from test_server import Scripted, post, sse

TINY = ROOT / "weights" / "tiny-hunyuan"
LIMIT = 64


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY)


@pytest.fixture(scope="module")
def live(model):
    s = LiveServer(model, max_tokens=LIMIT, max_context=256, slots=2, queue=4)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture
def scripted(monkeypatch, model):
    def use(text):
        monkeypatch.setattr("tinyhun.server.openai_api.make_sampler", lambda **kw: Scripted(model.tokenizer, text))
    return use


def test_echo_with_max_tokens_0_scores_the_prompt_only(client, live, model):
    """OpenAI's legacy endpoint and vLLM score a prompt this way (evaluation harnesses): the prompt's tokens and
    logprobs, nothing generated; the same scores as with a token generated. Without echo it is still a 400."""
    ids = model.tokenizer.encode("The quick brown fox")
    one = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp, want = r.choices[0].logprobs, one.choices[0].logprobs
    assert r.choices[0].text == model.tokenizer.decode(ids) and r.choices[0].finish_reason == "length"
    assert (lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset) == (
        want.tokens[:-1], want.token_logprobs[:-1], want.top_logprobs[:-1], want.text_offset[:-1])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    chunks = [json.loads(d) for d in sse(post(live, "/v1/completions", {
        "model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2, "stream": True}))[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == r.choices[0].text
    assert [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]] == \
        lp.tokens
    for body in ({"model": "tiny", "prompt": "Hi", "max_tokens": 0}, {"model": "tiny", "prompt": "Hi", "max_tokens": 0,
                                                                       "stream": True}):
        bad = post(live, "/v1/completions", body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        assert "echo" in bad.json()["error"]["message"]



def streamed_logprobs(client, **kw):
    """[(reasoning, content, [(token, logprob)] or None)] of each chunk of a streamed chat reply with logprobs."""
    return [(getattr(c.choices[0].delta, "reasoning_content", None) or "", c.choices[0].delta.content or "",
             None if c.choices[0].logprobs is None else [(e.token, e.logprob) for e in c.choices[0].logprobs.content])
            for c in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=LIMIT, stream=True, logprobs=True, **kw)
            if c.choices]


@pytest.mark.parametrize("text, stop, shown", [
    ("well, this is bullshit, sorry", None, "well, this is ********, sorry"),   # the filter holds a term back
    ("Hello there STOP and more", "STOP", "Hello there "),                       # a stop string holds text back
    ("caf\u00e9 \u4f60\u597d, ok", None, "caf\u00e9 \u4f60\u597d, ok"),               # characters of several tokens
])
def test_streamed_logprobs_travel_with_their_text(client, scripted, model, text, stop, shown):
    """OpenAI's and llama.cpp's rule: a chunk carries the logprobs of exactly the tokens whose text (the last of
    it) is in that chunk; a token with no text of its own goes with the text after it, and tokens whose text never
    shows (a stop string, the end-of-turn token) with the last chunk."""
    scripted(text)
    chunks = streamed_logprobs(client, stop=stop)
    assert "".join(c for _, c, _ in chunks) == shown
    assert chunks[0][2] is None   # the role's chunk
    tok = model.tokenizer
    ids = tok.encode(text, add_special_tokens=False) + [min(tok.stop_ids)]
    n = sum(len(ts or ()) for *_, ts in chunks)   # tokens generated: all, or up to the stop string's last
    assert [t for *_, ts in chunks for t, _ in ts or ()] == [tok.decode([i], skip_special_tokens=False)
                                                             for i in ids[:n]]
    # where each token's text ends, in characters; a token ending inside a character has no text of its own
    ends = []
    for i in range(n):
        whole = tok.decode(ids[:i + 1])
        ends.append(ends[-1] if i and (whole.endswith("\ufffd") or len(whole) == ends[-1]) else len(whole))
    sent, j = 0, 0
    for k, (_, content, ts) in enumerate(chunks):
        before, sent = sent, sent + len(content)
        for _ in ts or ():
            if ends[j] <= len(shown) and ends[j] > (ends[j - 1] if j else 0):
                assert before < ends[j] <= sent, (k, j, chunks)   # its text's last character is in this chunk
            else:
                assert content or k == len(chunks) - 1, (k, j, chunks)   # no text: with the text after it, or last
            j += 1


def test_streamed_logprobs_with_thinking(client, scripted):
    scripted("<think>\nThe user greets me.\n</think>\n<answer>\nHello, how can I help?\n</answer>")
    chunks = streamed_logprobs(client)
    thought = "".join(t for r, c, ts in chunks if r and not c for t, _ in ts or ())
    answered = "".join(t for r, c, ts in chunks if c for t, _ in ts or ())
    assert thought.startswith("<think>") and "The user greets me." in thought and "Hello" not in thought
    assert "Hello, how can I help?" in answered and "greets" not in answered
    assert all(ts is None or r or c or k == len(chunks) - 1 for k, (r, c, ts) in enumerate(chunks))
    assert "".join(r for r, _, _ in chunks) == "The user greets me."
