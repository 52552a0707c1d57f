"""The server over the paged KV pool: admission (a request that can never fit is a 400 naming the numbers),
waiting for memory, preemption of the newest sequence when blocks run out (its stream goes on unchanged), prefix
sharing across slots, and the pool in /metrics."""
import gc
import threading

import httpx
import numpy as np
import openai
import pytest

import tinyhun
from live_server import LiveServer
from oracle import ROOT
from tinyhun.errors import TinyhunError
from tinyhun.generation import generate_step
from tinyhun.kernels.kv import BLOCK
from tinyhun.sampling import make_sampler
from tinyhun.server.jobs import Job
from tinyhun.server.scheduler import Engine

TINY = ROOT / "weights" / "tiny-hunyuan"
BLOCKS = 8   # the pool: 256 tokens


@pytest.fixture(scope="module")
def small():
    """The tiny model over a pool of BLOCKS blocks: four sequences of ~100 tokens cannot all be held at once."""
    probe = tinyhun.load(TINY, kv_dtype="fp16")
    return tinyhun.load(TINY, kv_dtype="fp16", kv_memory=BLOCKS * probe.kv_pool.block_bytes)


def run_jobs(engine, jobs):
    """Submit (prompt, max_tokens) jobs at once; each one's Steps (or the exception it got)."""
    out = [[] for _ in jobs]
    done = [threading.Event() for _ in jobs]

    def emit(i):
        def put(step):
            out[i].append(step)
            if isinstance(step, Exception) or step.finish_reason:
                done[i].set()
        return put
    for i, (ids, n) in enumerate(jobs):
        engine.submit(Job(ids, make_sampler(), n, emit(i)))
    assert all(d.wait(120) for d in done)
    return out


def test_exhausted_pool_preempts_and_every_stream_equals_its_single_stream(small):
    rng = np.random.default_rng(0)
    jobs = [([int(i) for i in rng.integers(3, 400, size=40 + 9 * k)], 60) for k in range(4)]
    want = [list(generate_step(small, ids, make_sampler(), n)) for ids, n in jobs]
    engine = Engine(small, slots=4, queue_size=4)
    try:
        got = run_jobs(engine, jobs)
    finally:
        engine.close()
    assert not any(isinstance(s, Exception) for steps in got for s in steps)
    assert [[s.token for s in steps] for steps in got] == [w[:len(g)] for w, g in zip(want, got)]
    assert all(len(g) == len(w) or g[-1].token in small.tokenizer.stop_ids for w, g in zip(want, got))
    assert engine.preempted > 0   # 4 x ~110 tokens in a 256-token pool
    del engine   # and the finished jobs' caches it kept: every block goes back
    gc.collect()
    assert small.kv_pool.used == 0


def test_a_job_that_can_never_fit_is_refused_with_the_numbers(small):
    engine = Engine(small, slots=2, queue_size=2)
    try:
        with pytest.raises(TinyhunError, match=rf"= 300 tokens exceed this server's KV memory of {BLOCKS * BLOCK}"):
            engine.submit(Job(list(range(3, 103)), make_sampler(), 200, lambda s: None))
    finally:
        engine.close()


def test_live_server_under_memory_pressure(small):
    live = LiveServer(small, max_tokens=200, slots=4, queue=8)
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
        system = "You answer questions about bikes. " * 6   # a shared system prompt: its blocks are stored once
        users = ["Hello", "What do you sell?", "Opening hours?", "Returns?"]

        def ask(u):
            return client.chat.completions.create(model="tiny", max_tokens=40, temperature=0, messages=[
                {"role": "system", "content": system}, {"role": "user", "content": u}])
        want = [ask(u).choices[0].message.content for u in users]   # one at a time
        results = [None] * len(users)

        def worker(i):
            results[i] = ask(users[i]).choices[0].message.content
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(users))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == want
        r = httpx.post(live.url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 200, "messages": [
            {"role": "user", "content": "word " * 100}]}, timeout=60)
        assert r.status_code == 400 and "exceed this server's KV memory of 256 tokens" in r.json()["error"]["message"]
        metrics = httpx.get(live.url + "/metrics", timeout=10).text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("tinyhun_") and not line.startswith("#")}
        assert values["tinyhun_kv_blocks"] == BLOCKS and values["tinyhun_kv_block_tokens"] == BLOCK
        assert values["tinyhun_kv_blocks_used"] + values["tinyhun_kv_blocks_free"] == BLOCKS
        assert 0 < values["tinyhun_prefix_hit_rate"] < 1   # the system prompt's blocks were found again
    finally:
        live.close()
