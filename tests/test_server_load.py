"""The server under pressure, on the tiny checkpoint and loopback only: a client that goes away frees its slot
at once, a full server answers 429 with Retry-After, and 200 concurrent streams all end (served or 429)."""
import asyncio
import json
import time

import httpx
import pytest

import tinyhun
from live_server import LiveServer
from oracle import ROOT

TINY = ROOT / "weights" / "tiny-hunyuan"


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY)


def chat(content, **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}


def test_disconnect_frees_the_slot_and_a_full_server_says_429(model):
    s = LiveServer(model, slots=1, queue=0, max_tokens=2000)
    try:
        # greedy on the tiny model runs all 2000 tokens (~6 s): only a cancel ends it early
        with httpx.Client(timeout=30) as c, c.stream("POST", s.url + "/v1/chat/completions",
                                                     json=chat("Hello", max_tokens=2000, temperature=0,
                                                               stream=True)) as r:
            lines = r.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data: ")) >= 3
            busy = httpx.post(s.url + "/v1/chat/completions", json=chat("Hi", max_tokens=2), timeout=30)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
        left = time.monotonic()
        while s.engine.busy_slots() and time.monotonic() - left < 5:
            time.sleep(0.005)
        freed = time.monotonic() - left
        assert s.engine.busy_slots() == 0 and freed < 1.0, freed
        r = httpx.post(s.url + "/v1/chat/completions", json=chat("Hi", max_tokens=2), timeout=30)
        assert r.status_code == 200
        metrics = httpx.get(s.url + "/metrics").text
        assert "tinyhun_cancelled_total 1.0" in metrics
    finally:
        s.close()


def test_a_client_gone_before_a_whole_answer_frees_the_slot(model):
    s = LiveServer(model, slots=1, queue=0, max_tokens=2000)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2000,
                                                        "temperature": 0}, timeout=0.5)
        left = time.monotonic()
        while s.engine.busy_slots() and time.monotonic() - left < 5:
            time.sleep(0.005)
        assert s.engine.busy_slots() == 0 and time.monotonic() - left < 1.0
    finally:
        s.close()


async def _gone_before_first_byte(app, body):
    """One streaming request through the ASGI app whose client is gone as soon as the body is in, and whose
    server's send yields to the event loop (as uvicorn's does while a transport is paused, and other ASGI servers'
    always): the disconnect lands while the response starts, before its stream of chunks is first iterated.
    Returns what the app sent."""
    data = json.dumps(body).encode()
    messages = [{"type": "http.request", "body": data, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        await asyncio.sleep(0)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]}
    await app(scope, receive, send)
    return sent


def test_a_stream_gone_before_its_first_byte_frees_the_slot(model):
    s = LiveServer(model, slots=1, queue=0, max_tokens=2000)
    try:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2000, "temperature": 0, "stream": True}
        sent = asyncio.run(_gone_before_first_byte(s.app, body))
        assert not any(m.get("body") for m in sent)   # not a byte of the stream went out
        left = time.monotonic()
        while s.engine.busy_slots() and time.monotonic() - left < 5:
            time.sleep(0.005)
        freed = time.monotonic() - left
        assert s.engine.busy_slots() == 0 and freed < 1.0, freed   # greedy runs 2000 tokens (~6 s) uncancelled
        assert "tinyhun_cancelled_total 1.0" in httpx.get(s.url + "/metrics").text
    finally:
        s.close()


async def _stream_one(client, url, i):
    body = chat(f"Request {i}: hello", max_tokens=16, temperature=0.7, seed=i, stream=True)
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code == 429:
            await r.aread()
            return "429"
        assert r.status_code == 200, r.status_code
        data = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    finish = [c["choices"][0]["finish_reason"] for c in map(json.loads, data[:-1]) if c["choices"]]
    assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
    return "ok"


def test_200_concurrent_streams_complete_or_get_429(model):
    s = LiveServer(model, slots=4, queue=32, max_tokens=64)

    async def run():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(_stream_one(client, s.url, i) for i in range(200))), timeout=120)
    try:
        results = asyncio.run(run())
        assert len(results) == 200 and set(results) <= {"ok", "429"}
        assert results.count("ok") >= 4 + 32
        health = httpx.get(s.url + "/health").json()
        assert health["status"] == "ok" and health["busy_slots"] == 0 and health["queue_depth"] == 0
        metrics = httpx.get(s.url + "/metrics").text
        assert f"tinyhun_rejected_total {results.count('429')}.0" in metrics
    finally:
        s.close()
