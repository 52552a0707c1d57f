"""`tinyhun eval`: measure a model on a task file, from the library or the command line.

- perplexity(model, text): raw text (never chat-formatted), the strided sliding window of transformers' perplexity
  recipe: windows of `window` tokens starting every `stride` tokens, each run from a fresh cache; a window scores
  only the tokens no earlier window scored, each seeing up to window - 1 tokens of context. exp(mean NLL).
- choice(model, items): multiple choice by log-likelihood. An item is {"context", "choices", "answer"}; each choice
  (encoded on its own, without special tokens, and appended to the context's ids, as lm-evaluation-harness does)
  is scored by the summed log-probability of its tokens given the context, and that sum divided by the choice's
  length in characters (lm-eval's acc_norm). Accuracy with its 95 % Wilson interval, for both.
- generate(model, items): prompt -> greedy answer, scored against {"answer": str or [str, ...]} by exact match and
  by contains (after casefolding and collapsing whitespace): customer-service style checks.

Every result is a dict (the CLI's --json), with the tokens evaluated and tokens/s. Sample tasks of each kind ship
in tinyhun/data/eval/ (`SAMPLES`; the CLI takes the word `sample` for them).
"""
import json
import math
import re
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import TinyhunError

DATA = Path(__file__).resolve().parent / "data" / "eval"
SAMPLES = {"perplexity": DATA / "support.txt", "choice": DATA / "choice.jsonl", "generate": DATA / "generate.jsonl"}
Z95 = 1.959963984540054


def log_softmax_at(logits, ids):
    """log p(ids[i]) under each row logits[i], in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    return z[np.arange(len(ids)), ids] - lse


def windows(n, window, stride):
    """(begin, end, first scored position) of each window over n tokens, as transformers' strided recipe."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


def perplexity(model, text, window=None, stride=None, limit=None, progress=False):
    """Perplexity of raw text (see the module doc); limit: score at most this many tokens (from the start)."""
    tok = _tokenizer(model)
    window = window or min(1024, model.max_context)
    stride = stride or max(1, window // 2)
    if not 2 <= window <= model.max_context:
        raise TinyhunError(f"window={window}: expected 2..{model.max_context} (the model's loaded context)")
    if not 1 <= stride <= window - 1:
        raise TinyhunError(f"stride={stride}: expected 1..{window - 1} (less than the window)")
    ids = np.asarray(tok.encode(text), np.int64)
    if limit is not None:
        ids = ids[:limit + 1]
    if len(ids) < 2:
        raise TinyhunError("perplexity: the text has fewer than 2 tokens")
    nll, scored, run = 0.0, 0, 0
    start = time.perf_counter()
    spans = windows(len(ids), window, stride)
    for begin, end, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress, leave=False):
        logits = model.logits(ids[begin:end - 1])[first - 1 - begin:]
        nll -= float(log_softmax_at(logits, ids[first:end]).sum())
        scored += end - first
        run += end - 1 - begin
    seconds = time.perf_counter() - start
    # tokens_per_s: tokens run through the model (context included), the throughput; scored_per_s: tokens scored
    return {"task": "perplexity", "perplexity": math.exp(nll / scored), "nll": nll / scored, "tokens": scored,
            "tokens_run": run, "windows": len(spans), "window": window, "stride": stride, "seconds": seconds,
            "tokens_per_s": run / seconds, "scored_per_s": scored / seconds}


def choice_scores(model, ids_context, continuations):
    """Summed log-probability of each continuation (token ids) after the context ids: the context runs once, its
    cache is trimmed back to it for each choice."""
    cache = model.new_cache(len(ids_context) + max(len(c) for c in continuations))
    last = model.forward(cache, np.asarray(ids_context, np.int64))[0].copy()
    n = len(ids_context)
    scores = []
    for cont in continuations:
        cache.trim(n)
        cont = np.asarray(cont, np.int64)
        logits = np.empty((len(cont), model.config.vocab_size), np.float32)
        logits[0] = last
        if len(cont) > 1:
            model.forward(cache, cont[:-1], out=logits[1:])
        scores.append(float(log_softmax_at(logits, cont).sum()))
    return scores


def _first(items, limit, task):
    # the items a task evaluates: the first `limit` (all when None), at least one
    items = list(items)[:limit]
    if not items:
        raise TinyhunError(f"{task}: no items to evaluate")
    return items


def choice(model, items, limit=None, progress=False):
    """Multiple-choice accuracy (summed and length-normalised log-likelihood) over items (see the module doc)."""
    tok = _tokenizer(model)
    items = _first(items, limit, "choice")
    hits = hits_norm = tokens = 0
    rows = []
    start = time.perf_counter()
    for item in tqdm(items, desc="choice", unit="item", disable=not progress, leave=False):
        ctx = tok.encode(item["context"])
        conts = [tok.encode(c, add_special_tokens=False) for c in item["choices"]]
        if not all(conts):
            raise TinyhunError(f"{item['where']}: a choice encodes to no tokens")
        scores = choice_scores(model, ctx, conts)
        norm = [s / len(c) for s, c in zip(scores, item["choices"])]
        pick, pick_norm = int(np.argmax(scores)), int(np.argmax(norm))
        hits += pick == item["answer"]
        hits_norm += pick_norm == item["answer"]
        tokens += len(ctx) + sum(len(c) for c in conts)
        rows.append({"scores": scores, "scores_norm": norm, "pick": pick, "pick_norm": pick_norm,
                     "answer": item["answer"]})
    seconds = time.perf_counter() - start
    n = len(items)
    return {"task": "choice", "items": n, "accuracy": hits / n, "accuracy_95": wilson(hits, n),
            "accuracy_norm": hits_norm / n, "accuracy_norm_95": wilson(hits_norm, n), "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "per_item": rows}


def normalise(text):
    """casefolded, whitespace collapsed, surrounding punctuation dropped: "Paris." matches "paris" exactly."""
    return re.sub(r"\s+", " ", text).strip().strip(".!?,;:\"'").strip().casefold()


def generate(model, items, max_tokens=64, chat=None, limit=None, progress=False):
    """Greedy answers to prompts, scored by exact match and contains against each item's answer(s)."""
    from .generation import stream_generate
    _tokenizer(model)
    items = _first(items, limit, "generate")
    exact = contains = tokens = 0
    rows = []
    start = time.perf_counter()
    for item in tqdm(items, desc="generate", unit="item", disable=not progress, leave=False):
        steps = list(stream_generate(model, item["prompt"], max_tokens=item.get("max_tokens", max_tokens),
                                     chat=chat, system=item.get("system")))
        text = "".join(s.text for s in steps)
        out, refs = normalise(text), [normalise(a) for a in item["answer"]]
        e, c = out in refs, any(r in out for r in refs)
        exact += e
        contains += c
        tokens += steps[-1].completion_tokens
        rows.append({"output": text, "exact": e, "contains": c})
    seconds = time.perf_counter() - start
    n = len(items)
    return {"task": "generate", "items": n, "exact_match": exact / n, "exact_match_95": wilson(exact, n),
            "contains": contains / n, "contains_95": wilson(contains, n), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "per_item": rows}


def wilson(k, n):
    """95 % Wilson score interval of a proportion k/n."""
    p, z2 = k / n, Z95 * Z95
    mid = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [0.0 if k == 0 else max(0.0, mid - half), 1.0 if k == n else min(1.0, mid + half)]


def _tokenizer(model):
    if model.tokenizer is None:
        raise TinyhunError("this model folder has no tokenizer (tokenizer.json or hy.tiktoken)")
    return model.tokenizer


# ---- task files ---------------------------------------------------------------------------------------------------

def task_path(path, kind):
    """A task file's path; the word `sample` names the shipped sample of that kind."""
    p = SAMPLES[kind] if str(path) == "sample" else Path(path)
    if not p.is_file():
        raise TinyhunError(f"{p}: not found (a {kind} task file; or `sample` for the shipped one)")
    return p


def read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TinyhunError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise TinyhunError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_jsonl(path, kind):
    """The items of a choice / generate task file, one JSON object a line (blank lines skipped), each checked."""
    items = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinyhunError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TinyhunError(f"{where}: expected a JSON object")
        items.append(_check_choice(obj, where) if kind == "choice" else _check_generate(obj, where))
    if not items:
        raise TinyhunError(f"{path}: holds no items")
    return items


def _check_choice(obj, where):
    ctx, choices, answer = obj.get("context"), obj.get("choices"), obj.get("answer")
    if not isinstance(ctx, str) or not ctx:
        raise TinyhunError(f"{where}: 'context' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TinyhunError(f"{where}: 'choices' must be a list of 2 or more non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise TinyhunError(f"{where}: 'answer' must be the index of the right choice (0..{len(choices) - 1})")
    return {"context": ctx, "choices": choices, "answer": answer, "where": where}


def _check_generate(obj, where):
    prompt, answer = obj.get("prompt"), obj.get("answer")
    if not isinstance(prompt, str) or not prompt:
        raise TinyhunError(f"{where}: 'prompt' must be a non-empty string")
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise TinyhunError(f"{where}: 'answer' must be a non-empty string or a list of them")
    item = {"prompt": prompt, "answer": answers, "where": where}
    for key, check in (("system", lambda v: isinstance(v, str)),
                       ("max_tokens", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)):
        if key in obj:
            if not check(obj[key]):
                raise TinyhunError(f"{where}: {key!r} has a bad value {obj[key]!r}")
            item[key] = obj[key]
    return item


def format_result(r):
    """A result as a few lines of text for the terminal."""
    head = f"{r['task']}: {r['file']}\n" if "file" in r else ""
    if r["task"] == "perplexity":
        return (head + f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens ({r['windows']} windows of "
                f"{r['window']}, stride {r['stride']}); {r['tokens_per_s']:.1f} tokens/s ({r['seconds']:.1f} s)")

    def pct(name):
        lo, hi = r[name + "_95"]
        return f"{100 * r[name]:.1f} % (95 % CI {100 * lo:.1f}-{100 * hi:.1f})"
    if r["task"] == "choice":
        return (head + f"accuracy {pct('accuracy')}, length-normalised {pct('accuracy_norm')} over {r['items']} "
                f"items; {r['tokens_per_s']:.1f} tokens/s ({r['seconds']:.1f} s)")
    return (head + f"exact match {pct('exact_match')}, contains {pct('contains')} over {r['items']} items; "
            f"{r['tokens_per_s']:.1f} tokens/s generated ({r['seconds']:.1f} s)")
