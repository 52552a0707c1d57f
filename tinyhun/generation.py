"""Generation: one token loop (`token_steps`) and its faces: `generate_step` (token ids), `stream_generate`
(per-token results: id, text delta, logprob, finish reason, token counts) and `generate` (text pieces).

The CLI, the benchmarks, a server and an evaluator all consume these. A KV cache passed in is reused: the prompt's
longest prefix already in it is not computed again (a chat's next turn, a request continuing a conversation).
"""
from dataclasses import dataclass

import numpy as np

from .errors import TinyhunError
from .sampling import make_sampler


@dataclass(frozen=True)
class Step:
    token: int                 # the sampled token id
    text: str                  # text released with this token (held back while it may start a stop string)
    logprob: float | None      # log p(token) under the model's distribution (logprobs=True), else None
    finish_reason: str | None  # None while generating; "stop" (stop token or string) or "length" on the last step
    prompt_tokens: int
    completion_tokens: int     # tokens sampled so far, this one included
    cached_tokens: int         # prompt tokens whose keys/values were reused from the cache


def prefill(model, cache, ids):
    """Bring the cache to hold exactly `ids`, computing only what it does not already hold; return the last
    position's logits [V] and how many prompt tokens were reused."""
    reused = min(cache.reuse(ids), len(ids) - 1)   # the last token is run again: its logits are needed
    cache.trim(reused)
    return model.forward(cache, ids[reused:])[0], reused


def check_context(model, n_prompt, max_tokens, cache):
    need = n_prompt + max_tokens
    limit = model.max_context if cache is None else cache.max_context
    if need > limit:
        raise TinyhunError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {need} exceeds the model's "
                           f"context of {limit} tokens; shorten the prompt or lower max_tokens")


def token_steps(model, prompt_ids, sampler, max_tokens, cache=None):
    """Yield (token, logits [V] it was sampled from, reused prompt tokens), one per decode step, until max_tokens
    (the caller stops on EOS). The logits are valid until the generator is resumed."""
    ids = [int(i) for i in np.asarray(prompt_ids, dtype=np.int64).reshape(-1)]
    if not ids:
        raise TinyhunError("the prompt is empty")
    check_context(model, len(ids), max_tokens, cache)
    cache = cache if cache is not None else model.new_cache(len(ids) + max_tokens)
    logits, reused = prefill(model, cache, ids)
    history = list(ids)
    token_buf = np.zeros(1, np.int64)
    for i in range(max_tokens):
        token = sampler(logits, history)
        history.append(token)
        yield token, logits, reused
        if i + 1 < max_tokens:
            token_buf[0] = token
            logits = model.forward(cache, token_buf)[0]


def generate_step(model, prompt_ids, sampler, max_tokens, cache=None):
    """Yield sampled token ids, one per decode step, until max_tokens (the caller stops on EOS)."""
    for token, _, _ in token_steps(model, prompt_ids, sampler, max_tokens, cache):
        yield token


def encode_prompt(tok, prompt, chat, system=None, chat_template_kwargs=None):
    if chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        text = tok.render_chat(messages, add_generation_prompt=True, **(chat_template_kwargs or {}))
        return tok.encode(text, add_special_tokens=False)
    if not isinstance(prompt, str):
        raise TinyhunError("a raw (non-chat) prompt must be a string")
    return tok.encode(prompt)


class _LogProb:
    """log softmax at one id, in a buffer allocated once per stream."""

    def __init__(self, vocab):
        self.buf = np.empty(vocab, np.float32)

    def __call__(self, logits, token):
        m = float(logits.max())
        np.subtract(logits, m, out=self.buf)
        np.exp(self.buf, out=self.buf)
        return float(logits[token]) - m - float(np.log(self.buf.sum(dtype=np.float64)))


def stream_generate(model, prompt, max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                    repetition_penalty=1.0, seed=None, chat=None, stop=(), system=None, cache=None, logprobs=False,
                    chat_template_kwargs=None):
    """Yield a Step per sampled token of the completion of `prompt` (a string, or a list of chat messages).

    chat=None uses the chat template when the tokenizer has one; chat_template_kwargs are extra template variables
    (e.g. enable_thinking, see tinyhun.thinking.think_prompt_args). Ends at a stop token, a stop string (its text
    not emitted), or after max_tokens tokens; the last Step says which. `cache` (Model.new_cache) is reused and
    left holding the conversation, so a next call whose prompt extends this one recomputes only the new part.
    """
    tok = model.tokenizer
    if tok is None:
        raise TinyhunError("this model folder has no tokenizer (tokenizer.json or hy.tiktoken)")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise TinyhunError(f"max_tokens={max_tokens!r}: expected an integer >= 1")
    if chat is None:
        chat = tok.has_chat_template
    sampler = make_sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty, seed=seed)
    stops = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
    ids = encode_prompt(tok, prompt, chat, system, chat_template_kwargs)
    logprob = _LogProb(model.config.vocab_size) if logprobs else None
    stream = tok.stream()
    pending = ""   # text held back because it may be the start of a stop string
    n = 0
    for token, logits, reused in token_steps(model, ids, sampler, max_tokens, cache):
        n += 1

        def step(text, finish):
            return Step(token, text, logprob(logits, token) if logprob else None, finish, len(ids), n, reused)
        last = token in tok.stop_ids or n == max_tokens
        if token not in tok.stop_ids:
            pending += stream.push(token)
        if last:
            pending += stream.flush()
        cut = first_stop(pending, stops)
        if cut is not None or last:
            finish = "length" if cut is None and token not in tok.stop_ids else "stop"
            yield step(pending if cut is None else pending[:cut], finish)
            return
        keep = held_back(pending, stops)
        yield step(pending[:len(pending) - keep], None)
        pending = pending[len(pending) - keep:]


def generate(model, prompt, **kwargs):
    """Yield the text pieces of stream_generate (same arguments)."""
    for s in stream_generate(model, prompt, **kwargs):
        if s.text:
            yield s.text


def first_stop(text, stops):
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text, stops):
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
