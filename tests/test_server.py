"""`tinyhun serve` on the tiny checkpoint, through the real openai client and raw HTTP on 127.0.0.1: chat and
completions, streamed and whole, usage, logprobs, stop strings, UTF-8, the errors, the API key, health, metrics,
tokenize, and the batching engine (greedy outputs as a single stream's)."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

import tinyhun
from live_server import LiveServer, wait_healthy
from oracle import ROOT
from tinyhun.model import Model
from tinyhun.server import Settings, create_app

TINY = ROOT / "weights" / "tiny-hunyuan"
KEY = "sk-test-key"
CONTEXT = 256
LIMIT = 64   # MAX_TOKENS


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY)


@pytest.fixture(scope="module")
def live(model):
    s = LiveServer(model, api_key=KEY, max_tokens=LIMIT, max_context=CONTEXT, slots=4, queue=8, max_body=20_000)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(live, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(live.url + path, json=body, headers=headers, timeout=60, **kw)
    return httpx.post(live.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=60, **kw)


def sse(response):
    """The data payloads of an SSE response, [DONE] included."""
    return [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]


def chat(content, **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}


def direct(model, prompt, **kw):
    return "".join(tinyhun.generate(model, prompt, **kw))


# ---- the API through the openai client ----

def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "tinyhun"


def test_chat_greedy_equals_the_library(client, model):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=24,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == direct(model, [{"role": "user", "content": "Hello"}], max_tokens=24)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (8, 24)
    assert r.usage.total_tokens == 32


@pytest.mark.parametrize("kw", [dict(temperature=0.9, seed=11, top_p=0.9),
                                dict(temperature=1.2, seed=3, extra_body={"top_k": 40, "min_p": 0.05},
                                     presence_penalty=0.5, frequency_penalty=0.3),
                                dict(temperature=0, max_completion_tokens=20, stop=["ab", "cd"])])
def test_chat_stream_equals_whole_for_a_seed(client, kw):
    kw = {"max_tokens": 40, **kw}
    if "max_completion_tokens" in kw:
        kw.pop("max_tokens")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, **kw)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing(live):
    r = post(live, "/v1/chat/completions", chat("Hi", max_tokens=8, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = sse(r)
    assert data[-1] == "[DONE]"
    objs = [json.loads(d) for d in data[:-1]]
    assert {o["object"] for o in objs} == {"chat.completion.chunk"}
    assert "usage" not in objs[0]    # no usage fields unless asked for


def test_completions_stream_equals_whole(client, model):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=30, temperature=0.8, seed=5)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    greedy = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=30, temperature=0)
    assert greedy.choices[0].text == direct(model, "The quick brown fox", chat=False, max_tokens=30)


def test_completions_batch_of_prompts(client, model):
    r = client.completions.create(model="tiny", prompt=["One", "Two two"], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [direct(model, p, chat=False, max_tokens=6) for p in ("One", "Two two")]
    assert r.usage.completion_tokens == 12


def test_echo_logprobs_score_the_prompt(client, model):
    """The legacy shape lm-evaluation-harness reads: prompt tokens first (None for the first), then the tokens
    generated, each logprob that of the model's log-softmax at the position before."""
    ids = model.tokenizer.encode("The quick brown fox")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    logits = model.logits(ids).astype(np.float64)
    ref = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    want = [ref[i - 1, ids[i]] for i in range(1, len(ids))] + [ref[-1].max()]   # greedy: the last is the argmax
    np.testing.assert_allclose(lp.token_logprobs[1:], want, rtol=0, atol=1e-4)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert max(lp.top_logprobs[-1].values()) == pytest.approx(lp.token_logprobs[-1], abs=1e-6)
    assert lp.text_offset == sorted(lp.text_offset)
    assert r.choices[0].text.startswith(model.tokenizer.decode(ids))


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 5
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6)   # greedy: the top token


def test_stop_strings_spanning_chunks_never_leak(client, model):
    messages = [{"role": "user", "content": "Hello"}]
    full = direct(model, messages, max_tokens=40)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, temperature=0, stream=True) if c.choices]
    # a stop string that spans at least two streamed pieces
    bounds = np.cumsum([len(p) for p in pieces])
    at = next(int(b) for b in bounds if 2 <= b < len(full) - 3)
    stop = full[at - 2:at + 2]
    want = full[:full.find(stop)]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0, stop=stop)
    assert got.choices[0].message.content == want and got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, temperature=0, stream=True, stop=[stop]) if c.choices)
    assert streamed == want


def test_utf8_intact_across_chunks(live, model):
    for prompt in ("你好，世界", "emoji 😀🎉 ok"):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 1.0, "seed": 2}
        streamed = post(live, "/v1/completions", {**body, "stream": True})
        pieces = [json.loads(d)["choices"][0]["text"] for d in sse(streamed)[:-1]]
        for p in pieces:
            p.encode("utf-8")   # strict: a lone surrogate (half a character) raises
        want = "".join(tinyhun.generate(model, prompt, chat=False, max_tokens=40, temperature=1.0, seed=2))
        assert "".join(pieces) == want
        echoed = post(live, "/v1/completions", {**body, "echo": True, "max_tokens": 1}).json()
        assert echoed["choices"][0]["text"].startswith(prompt)


def test_batched_greedy_equals_single_streams(live, model, monkeypatch):
    """Greedy jobs decoded together equal their single streams; their steps pick the tokens in the forward
    (forward_batch argmax=True: on a GPU only ids come down), while a step holding a job that wants logprobs
    brings the logits up."""
    picks, forward_batch, forward = [], Model.forward_batch, Model.forward

    def recorded(self, caches, tokens, argmax=False):
        picks.append(argmax)
        return forward_batch(self, caches, tokens, argmax)

    def first(self, cache, ids, out=None, argmax=False):   # a prompt's pieces: the last one picks the first token
        firsts.append(argmax)
        return forward(self, cache, ids, out, argmax)
    firsts = []
    monkeypatch.setattr(Model, "forward_batch", recorded)
    monkeypatch.setattr(Model, "forward", first)
    prompts = ["Hello", "What is two plus two?", "你好", "A long time ago in a galaxy far away"]
    want = [direct(model, [{"role": "user", "content": p}], max_tokens=30) for p in prompts]
    hello = direct(model, [{"role": "user", "content": "Hello"}], max_tokens=5)
    picks.clear()
    firsts.clear()
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: post(live, "/v1/chat/completions", chat(p, max_tokens=30, temperature=0))
                            .json()["choices"][0]["message"]["content"], prompts))
    assert got == want
    assert picks and all(picks) and firsts == [True] * 4   # each prompt one piece, its first token picked there
    picks.clear()
    firsts.clear()
    r = post(live, "/v1/chat/completions", chat("Hello", max_tokens=5, temperature=0, logprobs=True)).json()
    assert r["choices"][0]["message"]["content"] == hello
    assert picks and not any(picks) and firsts == [False]


def test_a_long_prompt_is_prefilled_between_decode_steps(model, monkeypatch):
    """Chunked prefill: while one job decodes, a joiner's long prompt runs one piece (Model.forward's CHUNK) per turn
    of the engine, with a decode step of the other job between its pieces; its greedy tokens equal a single
    stream's."""
    from tinyhun.generation import generate_step
    from tinyhun.model import CHUNK
    from tinyhun.sampling import make_sampler
    from tinyhun.server.jobs import Job
    from tinyhun.server.scheduler import Engine
    long = [int(i) for i in np.random.default_rng(5).integers(0, 400, 2 * CHUNK + 40)]
    # the single stream on a model of its own: its blocks in `model`'s pool would be found by the job's prefill
    want = list(generate_step(tinyhun.load(TINY), long, make_sampler(), 8))
    events, forward, forward_batch = [], Model.forward, Model.forward_batch

    def prefilled(self, cache, ids, out=None, argmax=False):
        events.append(("prefill", id(cache), len(ids)))
        return forward(self, cache, ids, out, argmax)

    def decoded(self, caches, tokens, argmax=False):
        events.append(("decode", tuple(id(c) for c in caches)))
        return forward_batch(self, caches, tokens, argmax)
    monkeypatch.setattr(Model, "forward", prefilled)
    monkeypatch.setattr(Model, "forward_batch", decoded)
    steps, finished = {"a": [], "b": []}, {"a": threading.Event(), "b": threading.Event()}

    def emit(name):
        def put(step):
            steps[name].append(step)
            if isinstance(step, Exception) or step.finish_reason:
                finished[name].set()
        return put
    engine = Engine(model, slots=2, queue_size=0, max_context=3 * CHUNK + 64)
    try:
        engine.submit(Job([1, 2, 3], lambda logits, history: 5, 60, emit("a")))   # never a stop token
        deadline = time.monotonic() + 30
        while len(steps["a"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        engine.submit(Job(long, make_sampler(), 8, emit("b")))
        assert finished["a"].wait(60) and finished["b"].wait(60)
    finally:
        engine.close()
    assert not any(isinstance(s, Exception) for s in steps["a"] + steps["b"])
    got = [s.token for s in steps["b"]]
    assert got == want[:len(got)] and (len(got) == 8 or got[-1] in model.tokenizer.stop_ids)
    a_slot = next(e[1] for e in events if e[0] == "prefill")
    pieces = [i for i, e in enumerate(events) if e[0] == "prefill" and e[1] != a_slot]
    assert [events[i][2] for i in pieces] == [CHUNK, CHUNK, 40]
    for i, j in zip(pieces, pieces[1:]):
        assert ("decode", (a_slot,)) in events[i + 1:j], events[i:j + 1]


def test_conversation_reuses_its_prefix(client):
    history = [{"role": "user", "content": "Hello there"}]
    r1 = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
    history += [{"role": "assistant", "content": r1.choices[0].message.content},
                {"role": "user", "content": "And then?"}]
    r2 = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 1


# ---- errors ----

BAD = [  # (body, status, text the message must hold, code)
    (b"{not json", 400, "not valid JSON", None),
    (b"[1, 2]", 400, "must be a JSON object", None),
    (chat("hi", temperature="hot"), 400, "temperature", None),
    (chat("hi", max_tokens="10"), 400, "max_tokens", None),
    (chat("hi", temprature=0.5), 400, "temprature: unknown field", None),
    (chat("hi", toolz=[]), 400, "toolz: unknown field", None),
    (chat("hi", max_tokens=0), 400, "max_tokens", None),
    (chat("hi", max_tokens=-3), 400, "max_tokens", None),
    (chat("hi", max_tokens=LIMIT + 1), 400, f"limit of {LIMIT} (MAX_TOKENS)", None),
    (chat("hi", temperature=2.5), 400, "temperature: Input should be less than or equal to 2", None),
    (chat("hi", temperature=-0.1), 400, "temperature", None),
    (chat("hi", top_p=0), 400, "top_p", None),
    (chat("hi", n=17), 400, "n: Input should be less than or equal to 16", None),
    (chat("hi", stop=[1]), 400, "stop", None),
    (chat("hi", top_logprobs=3), 400, "top_logprobs needs logprobs", None),
    ({**chat("hi"), "model": "gpt-4"}, 404, "model 'gpt-4' not found", "model_not_found"),
    ({"model": "tiny", "messages": []}, 400, "messages: List should have at least 1 item", None),
    ({"model": "tiny"}, 400, "messages: required field missing", None),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role", None),
    (chat("word " * (CONTEXT + 10)), 400, "no room to generate", "exceed_context_size"),
    (chat("word " * 50, max_tokens=LIMIT), 400, "exceeds the context of 256", "exceed_context_size"),
]


@pytest.mark.parametrize("body, status, text, code", BAD)
def test_bad_chat_requests(live, body, status, text, code):
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert text in err["message"] and err["type"] and err["code"] == code


@pytest.mark.parametrize("body, text", [
    ({"model": "tiny", "prompt": ""}, "prompt: empty"),
    ({"model": "tiny", "prompt": [5, 100000]}, "out of range"),
    ({"model": "tiny", "prompt": "x", "logprobs": 9}, "logprobs"),
    ({"model": "tiny", "prompt": ["a", "b"], "stream": True}, "streaming takes one prompt"),
])
def test_bad_completion_requests(live, body, text):
    r = post(live, "/v1/completions", body)
    assert r.status_code == 400 and text in r.json()["error"]["message"], r.text


def test_oversized_body_is_413(live):
    r = post(live, "/v1/chat/completions", chat("x" * 30_000))
    assert r.status_code == 413 and "limit of 20000 bytes" in r.json()["error"]["message"]


def test_api_key(live):
    r = post(live, "/v1/chat/completions", chat("hi"), key=None)
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    r = post(live, "/v1/chat/completions", chat("hi"), key="sk-wrong")
    assert r.status_code == 401 and r.json()["error"]["message"] == "wrong API key"
    assert httpx.get(live.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(live.url + "/health").status_code == 200   # no key needed


def test_unknown_route_and_method_are_json(live):
    assert httpx.get(live.url + "/v1/nothing").json()["error"]["message"] == "no route /v1/nothing"
    r = httpx.get(live.url + "/v1/chat/completions")
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]["message"]


# ---- the other routes ----

def test_tokenize_detokenize(live, model):
    r = post(live, "/tokenize", {"prompt": "Hello 你好"}).json()
    assert r["tokens"] == model.tokenizer.encode("Hello 你好") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CONTEXT
    assert post(live, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == "Hello 你好"
    chat_ids = post(live, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    assert chat_ids == model.tokenizer.encode(model.tokenizer.render_chat([{"role": "user", "content": "Hi"}]),
                                              add_special_tokens=False)
    assert post(live, "/detokenize", {"tokens": [999999]}).status_code == 400
    assert post(live, "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}).status_code == 400


def test_metrics(live):
    post(live, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 3})
    text = httpx.get(live.url + "/metrics").text
    for name in ("tinyhun_requests_total", "tinyhun_completion_tokens_total", "tinyhun_queue_depth",
                 "tinyhun_request_seconds_bucket", "tinyhun_time_to_first_token_seconds_count", "tinyhun_slots 4.0"):
        assert name in text
    assert 'tinyhun_requests_total{route="/v1/completions",status="200"}' in text


def test_health_is_503_while_loading_and_after_a_failed_load(model, capfd):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return model, "tiny"

    for load, ready in ((slow_load, True), (lambda: (_ for _ in ()).throw(RuntimeError("disk on fire")), False)):
        s = _Bare(load)
        try:
            r = s.get("/health")
            assert r.status_code == 503
            assert s.get("/v1/models").status_code == 503
            gate.set()
            if ready:
                wait_healthy(s.url, 30)
            else:
                deadline = time.monotonic() + 10
                while "disk on fire" not in s.get("/health").text and time.monotonic() < deadline:
                    time.sleep(0.05)
                r = s.get("/health")
                assert r.status_code == 503 and r.json() == {"status": "error", "message": "RuntimeError: disk on fire"}
                assert "tinyhun serve: the model failed to load: RuntimeError: disk on fire\n" in capfd.readouterr().err
        finally:
            s.close()


class _Bare:
    """A server whose model may not be ready: started without waiting for /health."""

    def __init__(self, load):
        import socket

        import uvicorn
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(load, Settings()), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def get(self, path):
        return httpx.get(self.url + path, timeout=10)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# ---- styles, thinking, the content filter (chat endpoint) ----

class Scripted:
    """A sampler that 'generates' the tokens of a fixed text, then the end-of-turn token."""

    def __init__(self, tok, text):
        self.ids = tok.encode(text, add_special_tokens=False) + [min(tok.stop_ids)]
        self.i = 0

    def __call__(self, logits, history):
        self.i += 1
        return self.ids[min(self.i, len(self.ids)) - 1]


@pytest.fixture
def scripted(monkeypatch, model):
    def use(text):
        monkeypatch.setattr("tinyhun.server.openai_api.make_sampler", lambda **kw: Scripted(model.tokenizer, text))
    return use


def test_reasoning_content_is_separate_from_content(client, scripted):
    scripted("<think>\nThe user greets me.\n</think>\n<answer>\nHello, how can I help?\n</answer>")
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=LIMIT)
    msg = whole.choices[0].message
    assert (msg.reasoning_content, msg.content) == ("The user greets me.", "Hello, how can I help?")
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=LIMIT, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user greets me."
    assert "".join(d.content or "" for d in deltas) == "Hello, how can I help?"
    assert not any("<think>" in (d.content or "") for d in deltas)


def test_blocked_terms_are_masked_in_the_stream(client, scripted):
    scripted("well, this is bullshit, sorry")
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=LIMIT)
    assert whole.choices[0].message.content == "well, this is ********, sorry"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=LIMIT, stream=True) if c.choices]
    assert "".join(pieces) == "well, this is ********, sorry"


def test_blocked_prompt_is_refused_without_running_the_model(live, client):
    from tinyhun.content_filter import REFUSAL
    before = live.engine._load, live.app.state.server.metrics.completion_tokens._value.get()
    for stream in (False, True):
        body = chat("you are an ASSHOLE", max_tokens=10, stream=stream)
        r = post(live, "/v1/chat/completions", body)
        if stream:
            objs = [json.loads(d) for d in sse(r)[:-1]]
            assert objs[0]["choices"][0]["delta"]["content"] == REFUSAL
            assert objs[0]["choices"][0]["finish_reason"] == "content_filter"
        else:
            choice = r.json()["choices"][0]
            assert (choice["message"]["content"], choice["finish_reason"]) == (REFUSAL, "content_filter")
    assert (live.engine._load, live.app.state.server.metrics.completion_tokens._value.get()) == before


def test_style_and_think_shape_the_prompt(client, model):
    from tinyhun.styles import style_prompt
    messages = [{"role": "user", "content": "Where is my parcel?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"style": "formal"})
    assert r.choices[0].message.content == direct(model, messages, max_tokens=12, system=style_prompt("formal"))
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"think": False})
    assert r.choices[0].message.content == direct(model, messages, max_tokens=12,
                                                  chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(openai.BadRequestError, match="unknown style 'pirate'"):
        client.chat.completions.create(model="tiny", messages=messages, extra_body={"style": "pirate"})


def test_an_internal_error_is_a_json_500(live, monkeypatch):
    async def broken(server, req):
        raise RuntimeError("boom")
    monkeypatch.setattr("tinyhun.server.openai_api.chat", broken)
    r = post(live, "/v1/chat/completions", chat("hi"))
    assert r.status_code == 500 and r.json()["error"] == {"message": "internal error: RuntimeError: boom",
                                                          "type": "server_error", "param": None, "code": None}
    assert post(live, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2}).status_code == 200
