"""Constrained decoding: the token mask's cost per constrained row against a decode step, 4 constrained streams
batched against one, and the validity of sampled JSON.

    python bench/bench_constrain.py [--model DIR] [--rounds 3] [--validity 50] [--json]

Mask cost: a JSON-schema completion of the default model (SmolLM2-135M INT4) is generated once; each round replays
its tokens through a fresh matcher (mask computed, applied in place to a logits row, token consumed) and times a
greedy decode step of the same model, interleaved, so the ratio holds on a busy machine.

Batching: the server's Engine with 4 slots runs one constrained greedy job, then four at once (different prompts);
tokens per second of the four against the one (prefill included), rounds interleaved with the same two runs
unconstrained, whose ratio is the engine's own.

Validity: N completions sampled at temperature 1.0 over several schemas (nested objects, arrays, enums, required
fields), batched 4 at a time, each parsed and validated with jsonschema.
"""
import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tinyhun                                      # noqa: E402
from bench_filter import time_decode                # noqa: E402
from tinyhun.constrain import Constrained, Grammar  # noqa: E402
from tinyhun.kernels.token_mask import apply_token_mask  # noqa: E402
from tinyhun.sampling import make_sampler           # noqa: E402
from tinyhun.server.jobs import Job                 # noqa: E402
from tinyhun.server.scheduler import Engine         # noqa: E402

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
     "required": ["name", "age", "address"], "additionalProperties": False},
    {"type": "object", "properties": {
        "order_id": {"type": "integer"}, "status": {"enum": ["pending", "shipped", "delivered", "returned"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 12},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
     "required": ["order_id", "status", "items"], "additionalProperties": False},
    {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "neutral", "negative"]}, "confidence": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "urgent": {"type": "boolean"}},
     "required": ["sentiment", "urgent", "tags"], "additionalProperties": False},
]
PROMPTS = ["Describe a customer as JSON.", "Describe an order as JSON.", "Classify this review: 'Late and broken.'",
           "Give me a JSON record."]


def chat_ids(tok, text):
    return tok.encode(tok.render_chat([{"role": "user", "content": text}]), add_special_tokens=False)


def mask_cost(model, tokens, grammar, rounds_out):
    """Seconds per token: mask computed, applied to a logits row, token consumed (a fresh matcher a pass)."""
    row = np.zeros(model.config.vocab_size, np.float32)
    m = grammar.matcher()
    mask = np.empty((grammar.ll.vocab_size + 31) // 32, np.int32)
    t0 = time.perf_counter()
    for t in tokens:
        m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        apply_token_mask(row, mask)
        m.consume_token(t)
    rounds_out.append((time.perf_counter() - t0) / len(tokens))


def run_jobs(engine, jobs):
    """Submit the jobs at once; seconds until all are done, and each job's Steps."""
    done, lock, left = threading.Event(), threading.Lock(), [len(jobs)]
    steps = [[] for _ in jobs]

    def sink(out):
        def emit(event):
            if isinstance(event, Exception):
                raise event
            out.append(event)
            if event.finish_reason:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        return emit
    t0 = time.perf_counter()
    for job, out in zip(jobs, steps):
        job.emit = sink(out)
        engine.submit(job)
    done.wait()
    return time.perf_counter() - t0, steps


def constrained_job(model, grammar, prompt, max_tokens, temperature=0.0, seed=None):
    """A job whose sampler is behind `grammar` (None: the plain sampler, the unconstrained baseline)."""
    sampler = make_sampler(temperature=temperature, seed=seed)
    sampler = sampler if grammar is None else Constrained(sampler, grammar)
    return Job(chat_ids(model.tokenizer, prompt), sampler, max_tokens, None)


def validity(model, engine, n, max_tokens):
    """(valid, ended with "stop", valid among those) of n completions sampled at temperature 1.0, 4 at a time: one
    cut by max_tokens is incomplete JSON, not a fault of the constraint."""
    import jsonschema
    grammars = [Grammar(model.tokenizer, model.config.vocab_size, "json_schema", s) for s in SCHEMAS]
    ok = stopped = stopped_ok = 0
    for start in range(0, n, 4):
        ks = range(start, min(n, start + 4))
        _, outs = run_jobs(engine, [constrained_job(model, grammars[k % len(SCHEMAS)], PROMPTS[k % len(PROMPTS)],
                                                    max_tokens, 1.0, k) for k in ks])
        for k, steps in zip(ks, outs):
            stop = steps[-1].finish_reason == "stop"
            stopped += stop
            try:
                jsonschema.validate(json.loads("".join(s.text for s in steps)), SCHEMAS[k % len(SCHEMAS)])
                ok += 1
                stopped_ok += stop
            except (ValueError, jsonschema.ValidationError):
                pass
    return ok, stopped, stopped_ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per job in the batching run")
    ap.add_argument("--validity", type=int, default=0, help="sampled completions to validate (0: skip)")
    ap.add_argument("--validity-tokens", type=int, default=128, help="max_tokens of each sampled completion")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from tinyhun import hub
    model = tinyhun.load(a.model or hub.default_model_dir(), max_context=512)
    grammar = Grammar(model.tokenizer, model.config.vocab_size, "json_schema", SCHEMAS[1])
    steps = list(tinyhun.stream_generate(model, [{"role": "user", "content": PROMPTS[1]}], json_schema=SCHEMAS[1],
                                         max_tokens=64))
    tokens = [s.token for s in steps if s.token not in model.tokenizer.stop_ids]
    masks, decodes = [], []
    time_decode(model, 4)
    for _ in range(a.rounds):
        mask_cost(model, tokens, grammar, masks)
        decodes.append(time_decode(model))
    mask_s, step_s = statistics.median(masks), statistics.median(decodes)

    engine = Engine(model, slots=4, queue_size=8, max_context=512)
    run_jobs(engine, [constrained_job(model, grammar, PROMPTS[0], 4)])    # warm the batch shapes
    rates = {"one": [], "four": [], "plain_one": [], "plain_four": []}
    for _ in range(a.rounds):   # interleaved: a busy machine slows all four alike
        for name, g, prompts in (("one", grammar, PROMPTS[:1]), ("four", grammar, PROMPTS),
                                 ("plain_one", None, PROMPTS[:1]), ("plain_four", None, PROMPTS)):
            t, outs = run_jobs(engine, [constrained_job(model, g, p, a.tokens) for p in prompts])
            rates[name].append(sum(map(len, outs)) / t)
    r = {k: statistics.median(v) for k, v in rates.items()}
    result = {"mask_us_per_token": mask_s * 1e6, "decode_ms_per_step": step_s * 1e3,
              "mask_over_decode": mask_s / step_s, "replayed_tokens": len(tokens),
              "one_stream_tok_s": r["one"], "four_streams_tok_s": r["four"], "batched_over_one": r["four"] / r["one"],
              "plain_batched_over_one": r["plain_four"] / r["plain_one"]}
    if a.validity:
        ok, stopped, stopped_ok = validity(model, engine, a.validity, a.validity_tokens)
        result.update(validity_n=a.validity, valid=ok, finished_stop=stopped, valid_of_finished=stopped_ok)
    engine.close()
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
