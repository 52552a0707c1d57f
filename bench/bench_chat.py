"""Prefill saved by the chat's KV cache reuse over a 10-turn conversation.

    python bench/bench_chat.py [--model DIR] [--max-tokens 32] [--json]

Two conversations of the same ten customer-service messages, greedy so that both get the same replies: one keeps
its KV cache from turn to turn (what `tinyhun chat` does), the other empties it before each turn (every prompt
prefilled from scratch). Their turns are interleaved so both see the same machine load. Reported per turn: prompt
tokens, tokens reused from the cache, and the time to the first reply piece of each; in total, the share of
prompt tokens not recomputed and the ratio of the time to first token.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinyhun.chat import Conversation   # noqa: E402

MESSAGES = [
    "Hi, I ordered a blue jacket last week and it has not arrived yet.",
    "The order number is 48213. Can you check where it is?",
    "It says delivered, but I never got it. What should I do?",
    "I was home all day, nobody rang the bell.",
    "Can you send a replacement instead of a refund?",
    "How long will the replacement take?",
    "Can I change the size to medium while you are at it?",
    "Will I need to return anything?",
    "Please also update my phone number on the account.",
    "Thanks, that is all. Can you summarise what we agreed?",
]


def timed_turn(conv, text):
    t0 = time.perf_counter()
    first, reply = None, []
    for kind, piece in conv.reply(text):
        if kind == "stats":
            return first if first is not None else time.perf_counter() - t0, piece, "".join(reply)
        if first is None:
            first = time.perf_counter() - t0
        reply.append(piece)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path.home() / ".cache/tinyhun/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--style", default="friendly")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import tinyhun
    model = tinyhun.load(args.model)
    kw = dict(style=args.style, temperature=0, max_tokens=args.max_tokens)
    warm, cold = Conversation(model, **kw), Conversation(model, **kw)
    timed_turn(Conversation(model, **kw), "Hello")   # compile and caches out of the figures
    turns = []
    for text in MESSAGES:
        cold.cache.reset()
        w_ttft, w, w_reply = timed_turn(warm, text)
        c_ttft, c, c_reply = timed_turn(cold, text)
        turns.append({"prompt_tokens": w.prompt_tokens, "reused": w.cached_tokens, "ttft_reuse_s": w_ttft,
                      "ttft_cold_s": c_ttft, "same_reply": w_reply == c_reply})
    total = sum(t["prompt_tokens"] for t in turns)
    reused = sum(t["reused"] for t in turns)
    result = {"turns": turns, "prompt_tokens": total, "reused": reused, "prefill_saved_pct": 100 * reused / total,
              "ttft_ratio": sum(t["ttft_cold_s"] for t in turns) / sum(t["ttft_reuse_s"] for t in turns),
              "replies_equal": all(t["same_reply"] for t in turns)}
    if args.json:
        print(json.dumps(result))
        return
    print("turn  prompt  reused  computed  ttft reuse  ttft cold")
    for i, t in enumerate(turns, 1):
        print(f"{i:4d}  {t['prompt_tokens']:6d}  {t['reused']:6d}  {t['prompt_tokens'] - t['reused']:8d}  "
              f"{t['ttft_reuse_s'] * 1e3:8.1f}ms  {t['ttft_cold_s'] * 1e3:7.1f}ms")
    print(f"{args.max_tokens} tokens a reply: {reused} of {total} prompt tokens reused "
          f"({result['prefill_saved_pct']:.1f}% of the prefill saved); time to first token "
          f"{result['ttft_ratio']:.1f}x faster in total; "
          f"replies identical with and without reuse: {result['replies_equal']}")


if __name__ == "__main__":
    main()
