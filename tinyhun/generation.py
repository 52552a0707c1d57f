"""Generation: a token generator (`generate_step`) and a text streamer (`generate`) on top of it.

The CLI, the benchmarks and library users all consume these two generators.
"""
import numpy as np

from .errors import TinyhunError
from .sampling import make_sampler


def prefill(model, state, ids):
    """Feed prompt ids through the model in chunks; return the last position's logits [V]."""
    for start in range(0, len(ids), state.chunk):
        logits = model.forward(state, ids[start:start + state.chunk])
    return logits[0]


def generate_step(model, prompt_ids, sampler, max_tokens, state=None):
    """Yield sampled token ids, one per decode step, until max_tokens (the caller stops on EOS)."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if len(ids) == 0:
        raise TinyhunError("the prompt is empty")
    need = len(ids) + max_tokens
    limit = model.config.max_position_embeddings
    if need > limit:
        raise TinyhunError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {need} exceeds the model's "
                           f"context of {limit} tokens; shorten the prompt or lower max_tokens")
    state = state or model.new_state(need)
    state.reset()
    history = list(int(i) for i in ids)
    logits = prefill(model, state, ids)
    token_buf = np.zeros(1, np.int64)
    for i in range(max_tokens):
        token = sampler(logits, history)
        history.append(token)
        yield token
        if i + 1 < max_tokens:
            token_buf[0] = token
            logits = model.forward(state, token_buf)[0]


def encode_prompt(tok, prompt, chat, system=None):
    if chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        return tok.encode(tok.render_chat(messages, add_generation_prompt=True), add_special_tokens=False)
    if not isinstance(prompt, str):
        raise TinyhunError("a raw (non-chat) prompt must be a string")
    return tok.encode(prompt)


def generate(model, prompt, max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, seed=None, chat=None, stop=(), system=None):
    """Yield text pieces of the completion of `prompt` (a string, or a list of chat messages).

    chat=None uses the chat template when the tokenizer has one. Stops at a stop token, a stop string (not
    emitted), or after max_tokens tokens.
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
    ids = encode_prompt(tok, prompt, chat, system)
    stream = tok.stream()
    pending = ""   # text held back because it may be the start of a stop string
    for token in generate_step(model, ids, sampler, max_tokens):
        if token in tok.stop_ids:
            break
        pending += stream.push(token)
        cut = first_stop(pending, stops)
        if cut is not None:
            if cut:
                yield pending[:cut]
            return
        keep = held_back(pending, stops)
        if len(pending) > keep:
            yield pending[:len(pending) - keep]
            pending = pending[len(pending) - keep:]
    pending += stream.flush()
    cut = first_stop(pending, stops)
    pending = pending if cut is None else pending[:cut]
    if pending:
        yield pending


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
