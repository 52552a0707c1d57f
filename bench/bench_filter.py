"""The content filter's cost per streamed token against a decode step, and its interception rate.

    python bench/bench_filter.py [--model DIR] [--rounds 5] [--json]

Overhead: the text of tests/data/english.txt plus a Chinese paragraph (with planted blocked terms), cut into the
pieces the model's own tokenizer streams (StreamDecoder), goes through FilterStream.push with the default list;
the think/answer splitter is timed the same way. The peer is a greedy decode step of the model (SmolLM2 by
default), timed in the same run, interleaved round by round with the filter, so the ratio holds on a busy machine.

Interception: bench/data/filter_labelled.jsonl, one {"text", "blocked", "kind"} a line (positives with
obfuscations by kind, including kinds NFKC + casefold cannot catch; negatives with Scunthorpe-style near-misses),
run through ContentFilter.load().blocks.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinyhun.content_filter import ContentFilter   # noqa: E402
from tinyhun.thinking import ThinkSplitter           # noqa: E402

CHINESE = ("您好，欢迎联系客服。请问有什么可以帮您？我们的退货政策是收到商品后七天内可以无理由退货，"
           "运费由我们承担。如果商品有质量问题，请拍照上传，我们会尽快为您处理。你这个傻逼客服！"
           "抱歉给您带来不便，我们会改进服务。他妈的什么破服务。感谢您的耐心等待，祝您生活愉快。")


def token_pieces(tok, text):
    stream = tok.stream()
    pieces = [stream.push(i) for i in tok.encode(text, add_special_tokens=False)]
    return [p for p in pieces + [stream.flush()]]


def time_stream(make, pieces):
    """Seconds per piece for one pass of all pieces through a fresh stream (push each, flush once)."""
    s = make()
    t0 = time.perf_counter()
    for p in pieces:
        s.push(p)
    s.flush()
    return (time.perf_counter() - t0) / len(pieces)


def time_decode(model, steps=24):
    """Seconds per greedy decode step after a short prompt."""
    cache = model.new_cache(64 + steps)
    token = np.array([int(np.argmax(model.forward(cache, np.arange(1, 17))[0]))])
    t0 = time.perf_counter()
    for _ in range(steps):
        token[0] = int(np.argmax(model.forward(cache, token)[0]))
    return (time.perf_counter() - t0) / steps


def interception(flt, path):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kinds = {}
    for r in rows:
        k = kinds.setdefault((r["blocked"], r["kind"]), [0, 0])
        k[0] += flt.blocks(r["text"]) == r["blocked"]
        k[1] += 1
    pos = [r for r in rows if r["blocked"]]
    neg = [r for r in rows if not r["blocked"]]
    caught = sum(flt.blocks(r["text"]) for r in pos)
    false = sum(flt.blocks(r["text"]) for r in neg)
    return {"positives": len(pos), "caught": caught, "negatives": len(neg), "false_positives": false,
            "accuracy": (caught + len(neg) - false) / len(rows),
            "by_kind": {f"{'+' if b else '-'} {k}": f"{ok}/{n}" for (b, k), (ok, n) in kinds.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path.home() / ".cache/tinyhun/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import tinyhun
    model = tinyhun.load(args.model)
    flt = ContentFilter.load()
    text = (ROOT / "tests/data/english.txt").read_text(encoding="utf-8") + "\n" + CHINESE
    pieces = token_pieces(model.tokenizer, text)
    time_decode(model)   # warm-up (compile, caches)
    filt, split, decode = [], [], []
    for _ in range(args.rounds):   # interleaved: the peer sees the same machine load
        filt.append(time_stream(flt.stream, pieces))
        split.append(time_stream(ThinkSplitter, pieces))
        decode.append(time_decode(model))
    prompt = "Hello, I ordered a blue jacket last week and it still has not arrived. Can you check my order?"
    t0 = time.perf_counter()
    for _ in range(1000):
        flt.blocks(prompt)
    result = {
        "tokens_per_pass": len(pieces), "longest_entry": flt.longest, "entries": len(flt.entries),
        "filter_us_per_token": 1e6 * statistics.median(filt),
        "splitter_us_per_token": 1e6 * statistics.median(split),
        "decode_ms_per_token": 1e3 * statistics.median(decode),
        "filter_overhead_pct": 100 * statistics.median(f / d for f, d in zip(filt, decode)),
        "prompt_check_us": 1e6 * (time.perf_counter() - t0) / 1000,
        "interception": interception(flt, ROOT / "bench/data/filter_labelled.jsonl"),
    }
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    print(f"filter: {result['filter_us_per_token']:.1f} us/token over {len(pieces)} tokens "
          f"({result['entries']} entries, longest {result['longest_entry']}); think splitter "
          f"{result['splitter_us_per_token']:.1f} us/token; decode step {result['decode_ms_per_token']:.2f} ms "
          f"-> filter overhead {result['filter_overhead_pct']:.2f}% of a step (median of {args.rounds} rounds)")
    print(f"prompt check: {result['prompt_check_us']:.1f} us for a {len(prompt)}-character prompt")
    ic = result["interception"]
    print(f"interception: {ic['caught']}/{ic['positives']} positives blocked "
          f"({100 * ic['caught'] / ic['positives']:.1f}%), {ic['false_positives']}/{ic['negatives']} negatives "
          f"blocked ({100 * ic['false_positives'] / ic['negatives']:.1f}%), accuracy {100 * ic['accuracy']:.1f}%")
    for kind, score in ic["by_kind"].items():
        print(f"  {kind:28s} {score}")


if __name__ == "__main__":
    main()
