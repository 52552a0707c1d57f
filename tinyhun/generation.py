"""Generation: one token loop (`token_steps`) and its faces: `generate_step` (token ids), `stream_generate`
(per-token results: id, text delta, logprob, finish reason, token counts) and `generate` (text pieces).

The CLI, the benchmarks, a server and an evaluator all consume these. A KV cache passed in is reused: the prompt's
longest prefix already in it is not computed again (a chat's next turn, a request continuing a conversation).
"""
from dataclasses import asdict, dataclass

import numpy as np

from .errors import TinyhunError
from .sampling import SAMPLING_FIELDS, SamplingParams, make_sampler
from .tokenizer import held_back

_DEFAULT = SamplingParams()


@dataclass(frozen=True)
class Step:
    token: int                 # the sampled token id
    text: str                  # text released with this token (held back while it may start a stop string)
    logprob: float | None      # log p(token) under the model's distribution (logprobs=True), else None
    finish_reason: str | None  # None while generating; "stop" (stop token or string) or "length" on the last step
    prompt_tokens: int
    completion_tokens: int     # tokens sampled so far, this one included
    cached_tokens: int         # prompt tokens whose keys/values were reused from the cache
    top_logprobs: tuple | None = None   # ((id, logprob), ...) of the most likely tokens (top_logprobs=n)


def reuse_prompt(cache, ids):
    """Trim the cache to the longest prefix of the prompt `ids` it holds, short of the last token (run again: its
    logits are needed); return that prefix's length."""
    reused = min(cache.reuse(ids), len(ids) - 1)
    cache.trim(reused)
    return reused


def prefill(model, cache, ids, argmax=False):
    """Bring the cache to hold exactly `ids`, computing only what it does not already hold; return the last
    position's logits [V] (argmax=True: its greedy next token, picked where the logits are) and how many prompt
    tokens were reused."""
    reused = reuse_prompt(cache, ids)
    out = model.forward(cache, ids[reused:], argmax=argmax)
    return (out if argmax else out[0]), reused


def check_context(model, n_prompt, max_tokens, cache):
    need = n_prompt + max_tokens
    limit = model.max_context if cache is None else cache.max_context
    if need > limit:
        raise TinyhunError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {need} exceeds the model's "
                           f"context of {limit} tokens; shorten the prompt or lower max_tokens")


def token_steps(model, prompt_ids, sampler, max_tokens, cache=None, logits=True):
    """Yield (token, logits [V] it was sampled from, reused prompt tokens), one per decode step, until max_tokens
    (the caller stops on EOS). The logits are valid until the generator is resumed. logits=False: the caller does
    not read them, so a greedy sampler's decode steps pick on the model's side (None in their place; on a GPU only
    the token comes down)."""
    ids = [int(i) for i in np.asarray(prompt_ids, dtype=np.int64).reshape(-1)]
    if not ids:
        raise TinyhunError("the prompt is empty")
    check_context(model, len(ids), max_tokens, cache)
    cache = cache if cache is not None else model.new_cache(len(ids) + max_tokens)
    history = list(ids)
    token_buf = np.zeros(1, np.int64)
    pick_there = not logits and getattr(sampler, "greedy", False)
    out, reused = prefill(model, cache, ids, argmax=pick_there)
    logits, nxt = (None, out) if pick_there else (out, None)
    for i in range(max_tokens):
        token = sampler(logits, history) if nxt is None else nxt
        history.append(token)
        yield token, logits, reused
        if i + 1 < max_tokens:
            token_buf[0] = token
            if pick_there:
                nxt = model.forward(cache, token_buf, argmax=True)
                logits = None
            else:
                logits = model.forward(cache, token_buf)[0]


def generate_step(model, prompt_ids, sampler, max_tokens, cache=None):
    """Yield sampled token ids, one per decode step, until max_tokens (the caller stops on EOS)."""
    for token, _, _ in token_steps(model, prompt_ids, sampler, max_tokens, cache, logits=False):
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


class LogProb:
    """log softmax at one id (and the n most likely ids), in a buffer allocated once per stream."""

    def __init__(self, vocab):
        self.buf = np.empty(vocab, np.float32)

    def _log_total(self, logits):
        m = float(logits.max())
        np.subtract(logits, m, out=self.buf)
        np.exp(self.buf, out=self.buf)
        return m + float(np.log(self.buf.sum(dtype=np.float64)))

    def __call__(self, logits, token):
        return float(logits[token]) - self._log_total(logits)

    def top(self, logits, n):
        """[(id, logprob)] of the n most likely ids, most likely first."""
        total = self._log_total(logits)
        ids = np.argpartition(-logits, n - 1)[:n] if n < len(logits) else np.arange(len(logits))
        ids = ids[np.lexsort((ids, -logits[ids]))]   # most likely first, ties by the lower id
        return [(int(i), float(logits[i]) - total) for i in ids]


class Sequence:
    """One sequence's decode state after its prompt: the history the sampler sees, the streaming detokenizer,
    the text held back while it may start a stop string, and the counts. `advance(token, logits)` turns each
    sampled token into its Step. stream_generate and the server's batching scheduler both drive one, so a
    sequence decoded alone or among others yields the same Steps."""

    def __init__(self, tok, prompt_ids, sampler, max_tokens, stop=(), logprobs=False, top_logprobs=0,
                 reused=0, vocab=None):
        self.tok, self.sampler, self.max_tokens = tok, sampler, max_tokens
        self.prompt_tokens, self.reused = len(prompt_ids), reused
        self.history = [int(i) for i in prompt_ids]
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        self.top_logprobs = top_logprobs
        self.logprob = LogProb(vocab) if logprobs or top_logprobs else None
        self.stream = tok.stream()
        self.pending = ""   # text held back because it may be the start of a stop string
        self.n = 0
        self.finish_reason = None

    def sample(self, logits):
        return self.sampler(logits, self.history)

    def advance(self, token, logits):
        """The Step of `token`, sampled from `logits` (the last one has a finish_reason; advance no further)."""
        tok = self.tok
        self.n += 1
        self.history.append(token)
        last = token in tok.stop_ids or self.n == self.max_tokens
        if token not in tok.stop_ids:
            self.pending += self.stream.push(token)
        if last:
            self.pending += self.stream.flush()
        cut = first_stop(self.pending, self.stops)
        if cut is not None or last:
            self.finish_reason = "length" if cut is None and token not in tok.stop_ids else "stop"
            return self._step(token, logits, self.pending if cut is None else self.pending[:cut])
        keep = held_back(self.pending, self.stops)
        text, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return self._step(token, logits, text)

    def _step(self, token, logits, text):
        lp = top = None
        if self.logprob is not None:
            lp = self.logprob(logits, token)
            if self.top_logprobs:
                top = tuple(self.logprob.top(logits, self.top_logprobs))
        return Step(token, text, lp, self.finish_reason, self.prompt_tokens, self.n, self.reused, top)


def stream_generate(model, prompt, max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                    repetition_penalty=1.0, seed=None, chat=None, stop=(), system=None, cache=None, logprobs=False,
                    top_logprobs=0, presence_penalty=0.0, frequency_penalty=0.0, chat_template_kwargs=None,
                    json_schema=None, grammar=None, regex=None, choice=None, logit_bias=None, sampling=None):
    """Yield a Step per sampled token of the completion of `prompt` (a string, or a list of chat messages).

    chat=None uses the chat template when the tokenizer has one; chat_template_kwargs are extra template variables
    (e.g. enable_thinking, see tinyhun.thinking.think_prompt_args). Ends at a stop token, a stop string (its text
    not emitted), or after max_tokens tokens; the last Step says which. `cache` (Model.new_cache) is reused and
    left holding the conversation, so a next call whose prompt extends this one recomputes only the new part.
    top_logprobs=n also gives each Step the n most likely tokens with their logprobs.

    Constraints (tinyhun.constrain, at most one): json_schema (a dict or its JSON text), grammar (Lark or GBNF),
    regex, choice (a list of strings); logit_bias {token id: -100..100} (-100 bans the token). A thinking model's
    reasoning is left free: the constraint applies to the answer after `</think>`.

    sampling: a SamplingParams in place of its fields (temperature, top_k, top_p, min_p, repetition_penalty, seed,
    presence_penalty, frequency_penalty), which are then left at their defaults.
    """
    tok = model.tokenizer
    if tok is None:
        raise TinyhunError("this model folder has no tokenizer (tokenizer.json or hy.tiktoken)")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise TinyhunError(f"max_tokens={max_tokens!r}: expected an integer >= 1")
    if chat is None:
        chat = tok.has_chat_template
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=repetition_penalty, seed=seed, presence_penalty=presence_penalty,
                 frequency_penalty=frequency_penalty)
    if sampling is None:
        sampling = SamplingParams(**given)
    elif not isinstance(sampling, SamplingParams):
        raise TinyhunError(f"sampling={sampling!r}: expected a tinyhun.sampling.SamplingParams")
    elif any(given[k] != getattr(_DEFAULT, k) for k in SAMPLING_FIELDS):
        raise TinyhunError("pass either sampling= or its fields (temperature=, top_p=, ...), not both")
    sampler = make_sampler(**asdict(sampling))
    ids = encode_prompt(tok, prompt, chat, system, chat_template_kwargs)
    if json_schema is not None or grammar is not None or regex is not None or choice is not None or logit_bias:
        from .constrain import request_sampler
        sampler = request_sampler(sampler, tok, model.config.vocab_size, tok.decode(ids, skip_special_tokens=False),
                                  chat, json_schema, grammar, regex, choice, logit_bias)
    seq = None
    for token, logits, reused in token_steps(model, ids, sampler, max_tokens, cache,
                                             logits=bool(logprobs or top_logprobs)):
        if seq is None:
            seq = Sequence(tok, ids, sampler, max_tokens, stop, logprobs, top_logprobs, reused,
                           model.config.vocab_size)
        step = seq.advance(token, logits)
        yield step
        if step.finish_reason:
            return


def generate(model, prompt, **kwargs):
    """Yield the text pieces of stream_generate (same arguments)."""
    for s in stream_generate(model, prompt, **kwargs):
        if s.text:
            yield s.text


def first_stop(text, stops):
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
