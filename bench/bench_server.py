"""`tinyhun serve` on SmolLM2-135M-Instruct (INT4): continuous batching and HTTP throughput, in one run.

    python bench/bench_server.py [--model DIR] [--gen-tokens 64] [--rounds 2]

1. Decode, engine only: B streams decoded together (one Model.forward_batch per step) vs one stream, interleaved
   (1, B, 1, B, ...), total decode tokens/s and the ratio; every batched stream's greedy tokens must equal its
   tokens decoded alone.
2. HTTP: the server on 127.0.0.1 with 16 slots, 1, 4 and 16 concurrent streaming clients (greedy, a fixed number
   of tokens each): total completion tokens/s and time to first token p50/p95, beside the library's single
   stream measured just before.
3. A 10-turn chat through the server: the prompt tokens the slot's cache reused (prefill saved).
4. Adapters (`--adapters`: only this): 2 concurrent streaming clients on two different adapters (one forward per
   adapter per step) vs both on one adapter (one forward of 2 rows) vs both on the base, interleaved, total tok/s.
5. Chunked prefill (`--long-joiner N`: only this): a job with an N-token prompt joins one that is decoding; the
   decoding job's longest wait between two tokens and the joiner's time to first token, with the engine's
   chunked prefill (scheduler.PREFILL_BUDGET) and with each prompt prefilled whole in one turn, interleaved.
"""
import argparse
import asyncio
import json
import socket
import statistics
import threading
import time

import numpy as np

PROMPTS = ["Write a long story about a dragon who learns to cook.", "Explain how a steam engine works, in detail.",
           "Describe a walk through a busy market in Marrakech.", "Tell me about the history of the bicycle.",
           "Write a letter to a friend about your summer holidays.", "Explain photosynthesis to a child.",
           "Describe the rules of chess step by step.", "Write a poem about the sea at night."]


def ids_of(model, prompt):
    tok = model.tokenizer
    return tok.encode(tok.render_chat([{"role": "user", "content": prompt}]), add_special_tokens=False)


def decode_engine(model, prompts, steps):
    """Greedy decode of `steps` tokens for each prompt together; (decode seconds, tokens per prompt). The
    prefill is not timed: what is measured is the batched decode the engine runs between joins."""
    caches = model.new_caches(len(prompts), 512)
    tokens = [int(np.argmax(model.forward(c, ids_of(model, p))[0])) for c, p in zip(caches, prompts)]
    out = [[t] for t in tokens]
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        logits = model.forward(caches[0], tokens[:1]) if len(caches) == 1 else model.forward_batch(caches, tokens)
        tokens = [int(t) for t in np.argmax(logits, axis=-1)]
        for o, t in zip(out, tokens):
            o.append(t)
    return time.perf_counter() - t0, out


def bench_decode(model, batch, steps, rounds):
    prompts = PROMPTS[:batch]
    alone = {p: decode_engine(model, [p], steps)[1][0] for p in prompts}
    single, together = [], []
    for _ in range(rounds):   # interleaved: the machine is shared, so the two are measured side by side
        t, _ = decode_engine(model, prompts[:1], steps)
        single.append((steps - 1) / t)
        t, out = decode_engine(model, prompts, steps)
        together.append(batch * (steps - 1) / t)
        assert out == [alone[p] for p in prompts], "a batched stream's greedy tokens differ from its own alone"
    s, b = statistics.median(single), statistics.median(together)
    print(f"decode, engine: 1 stream {s:.1f} tok/s, {batch} streams {b:.1f} tok/s total -> {b / s:.2f}x "
          f"(median of {rounds}; greedy tokens of every batched stream equal its own alone: yes)")
    return b / s


def start_server(model, slots, max_tokens, max_context=512, adapters=None):
    import uvicorn

    from tinyhun.server import Settings, create_app
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(lambda: (model, "bench"), Settings(slots=slots, queue=64, max_tokens=max_tokens,
                                                        max_context=max_context, content_filter=False,
                                                        adapters=adapters or {}))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    import httpx
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return url, server
        except httpx.TransportError:
            pass
        time.sleep(0.1)


async def one_request(client, url, prompt, gen, model="bench"):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": gen,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens


async def clients(url, n, gen, per_client, models=None):
    """n concurrent clients (client i asks for models[i], default the base), per_client requests each."""
    import httpx
    models = models or ["bench"] * n
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n)) as client:
        async def worker(i):
            return [await one_request(client, url, PROMPTS[(i + k) % len(PROMPTS)], gen, models[i])
                    for k in range(per_client)]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(n))) for r in rs]
        return time.perf_counter() - t0, results


def library_rate(model, gen):
    """The peer: one stream_generate in this process (prefill included, as a request's is), tokens/s."""
    import tinyhun
    t0 = time.perf_counter()
    n = sum(1 for _ in tinyhun.stream_generate(model, [{"role": "user", "content": PROMPTS[0]}], max_tokens=gen))
    return n / (time.perf_counter() - t0)


def bench_http(model, gen, concurrency=(1, 4, 16)):
    url, server = start_server(model, max(concurrency), gen)
    asyncio.run(clients(url, 2, 4, 1))   # warm-up
    print(f"HTTP, {gen} greedy tokens per request, server with {max(concurrency)} slots; peer: the library's "
          "stream_generate alone, measured just before each row:")
    print(f"{'clients':>8} {'requests':>9} {'tok/s total':>12} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12} "
          f"{'peer tok/s':>11} {'ratio':>6}")
    for n in concurrency:
        per_client = max(1, 4 // n) if n < 4 else 1
        peer = library_rate(model, gen)
        wall, results = asyncio.run(clients(url, n, gen, per_client))
        ttfts = sorted(t for t, _ in results if t is not None)
        p50 = ttfts[len(ttfts) // 2] * 1000
        p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))] * 1000
        total = sum(k for _, k in results)
        print(f"{n:>8} {len(results):>9} {total / wall:>12.1f} {p50:>12.0f} {p95:>12.0f} {peer:>11.1f} "
              f"{total / wall / peer:>6.2f}")
    server.should_exit = True


def bench_conversation(model, turns=10, gen=32):
    """A conversation of `turns` turns through the server: the prompt tokens its slot's cache saved."""
    import httpx
    url, server = start_server(model, 2, gen, max_context=2048)
    history, total, cached, t0 = [], 0, 0, time.perf_counter()
    for i in range(turns):
        history.append({"role": "user", "content": PROMPTS[i % len(PROMPTS)]})
        r = httpx.post(url + "/v1/chat/completions", json={"model": "bench", "messages": history,
                                                           "max_tokens": gen, "temperature": 0}, timeout=600)
        r.raise_for_status()
        r = r.json()
        history.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        total += r["usage"]["prompt_tokens"]
        cached += r["usage"]["prompt_tokens_details"]["cached_tokens"]
    server.should_exit = True
    print(f"{turns}-turn chat: {cached} of {total} prompt tokens reused from the slot's cache "
          f"({100 * cached / total:.0f}% of the prefill saved), {time.perf_counter() - t0:.1f} s")


def bench_adapter_clients(model, gen, rounds, rank=16):
    """Two clients at once on two adapters, on one, and on the base: total completion tokens/s, interleaved."""
    import tempfile
    from pathlib import Path

    from bench_adapters import write_adapter
    with tempfile.TemporaryDirectory() as tmp:
        qv = ["q_proj", "v_proj"]
        adapters = {name: write_adapter(Path(tmp) / name, model.config, qv, rank, seed=i)
                    for i, name in enumerate(("a", "b"))}
        url, server = start_server(model, 2, gen, adapters=adapters)
        cases = {"2 clients, adapters a + b": ["a", "b"], "2 clients, adapter a + a": ["a", "a"],
                 "2 clients, base + base": ["bench", "bench"]}
        asyncio.run(clients(url, 2, 4, 1, ["a", "b"]))   # warm-up
        rates = {name: [] for name in cases}
        for _ in range(rounds):
            for name, models in cases.items():
                wall, results = asyncio.run(clients(url, 2, gen, 1, models))
                rates[name].append(sum(k for _, k in results) / wall)
        server.should_exit = True
    med = {name: statistics.median(r) for name, r in rates.items()}
    peer = med["2 clients, adapter a + a"]
    print(f"adapters (q,v rank {rank}, side path), {gen} greedy tokens per request, 2 slots, median of {rounds}:")
    for name, rate in med.items():
        print(f"  {name:28s} {rate:7.1f} tok/s total  x{rate / peer:.2f} of a + a")


def bench_long_joiner(model, n_prompt, rounds):
    """(longest gap between the decoding job's tokens while the joiner prefills, the joiner's time to first token),
    chunked vs whole, median of `rounds`."""
    from tinyhun.sampling import make_sampler
    from tinyhun.server import jobs, scheduler
    long = ids_of(model, " ".join(PROMPTS * 200))[:n_prompt]
    if len(long) < n_prompt:
        raise SystemExit(f"--long-joiner {n_prompt}: the sample text has only {len(long)} tokens")
    chunk = scheduler.PREFILL_BUDGET

    def once(budget):
        scheduler.PREFILL_BUDGET = budget
        engine = scheduler.Engine(model, 2, 0, max_context=n_prompt + 300)
        stamps, joined, first = [], threading.Event(), []
        done = threading.Event()

        def decoding(step):
            stamps.append(time.perf_counter())
            if isinstance(step, Exception) or step.finish_reason:
                done.set()
        try:
            engine.submit(jobs.Job(ids_of(model, PROMPTS[0]), lambda logits, h: 42, 250, decoding))
            while len(stamps) < 5:
                time.sleep(0.001)
            t0 = time.perf_counter()
            engine.submit(jobs.Job(long, make_sampler(), 1, lambda step: (first.append(time.perf_counter()),
                                                                              joined.set())))
            joined.wait(120)
            done.wait(120)
        finally:
            engine.close()
            scheduler.PREFILL_BUDGET = chunk
        gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b > t0 and a < first[0]]
        return max(gaps), first[0] - t0
    once(chunk)   # warm-up: compiles every row count
    res = {"chunked": [], "whole": []}
    for _ in range(rounds):
        res["chunked"].append(once(chunk))
        res["whole"].append(once(10 ** 9))
    print(f"a {n_prompt}-token prompt joins a decoding stream (2 slots), median of {rounds}:")
    for name, runs in res.items():
        gap, ttft = (statistics.median(r[i] for r in runs) for i in (0, 1))
        print(f"  prefill {name:8s} the decoding stream's longest gap {1000 * gap:7.1f} ms, "
              f"the joiner's time to first token {1000 * ttft:7.1f} ms")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="model folder (default: the default model, SmolLM2-135M-Instruct INT4)")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--adapters", action="store_true", help="only section 4, adapters per request")
    p.add_argument("--long-joiner", type=int, metavar="N", help="only section 5, chunked prefill of N tokens")
    args = p.parse_args()

    import tinyhun
    from tinyhun.hub import resolve_model
    model = tinyhun.load(resolve_model(args.model, progress=False), max_context=2048)
    if args.adapters:
        return bench_adapter_clients(model, args.gen_tokens, args.rounds)
    if args.long_joiner:
        return bench_long_joiner(model, args.long_joiner, args.rounds)
    bench_decode(model, args.batch, args.gen_tokens, args.rounds)
    if not args.skip_http:
        bench_http(model, args.gen_tokens)
        bench_conversation(model)


if __name__ == "__main__":
    main()
