"""`tinyhun serve` on the real default model (SmolLM2-135M-Instruct, INT4): the openai client's chat equals the
library's, and four streams decoded in one batch give each the tokens it gets alone."""
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import tinyhun
from live_server import LiveServer

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain what a CPU does in one sentence."]


@pytest.fixture(scope="module")
def model(smollm2_q4_dir):
    return tinyhun.load(smollm2_q4_dir, max_context=512)


@pytest.fixture(scope="module")
def client(model):
    s = LiveServer(model, name="smollm2", slots=4, queue=4, max_tokens=64)
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    s.close()


def ask(client, prompt, **kw):
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                       max_tokens=24, temperature=0, **kw)
    return r.choices[0].message.content


@pytest.mark.slow
def test_batched_greedy_chat_equals_the_library_alone(client, model):
    alone = ["".join(tinyhun.generate(model, [{"role": "user", "content": p}], max_tokens=24)) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(lambda p: ask(client, p), PROMPTS)) == alone


@pytest.mark.slow
def test_stream_equals_whole(client):
    kw = dict(model="smollm2", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=24, temperature=0.7,
              seed=4)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
