"""Constrained decoding and logit_bias: what a sequence may write, applied to its logits row before each sample.

The grammars come from llguidance (JSON Schema, Lark, GBNF, regular expressions, a list of choices), chosen over
outlines-core because it needs no per-schema index build (a matcher starts in ~1 ms where outlines-core compiles
a regex automaton over the vocabulary, seconds for a nested schema), supports Lark grammars with embedded JSON
schemas (what tool calls need: fixed text around each tool's arguments), and builds its tokenizer from the
`tokenizers` JSON tinyhun already loads. Its token mask is a bitmask of int32 words; kernels/token_mask.py applies
it to the row in place.

A constrained or biased sequence samples through a `Constrained` sampler: it wraps the request's Sampler, and
around each draw it applies the bias and the mask to that row and, after, feeds the drawn token to the matcher.
Everything that samples through a sampler (token_steps, the server's batching scheduler) so gets the constraint
per row, each row its own matcher; a request without constraints keeps the plain Sampler and pays nothing.
Its `greedy` is False, so the model never picks such a row's token by itself (forward argmax): the row comes down.

Thinking models: the constraint starts after the reasoning ends (as vLLM's reasoning parsers do): while `wait_for`
is set (the reply opens with a think block the prompt did not close), tokens are free until the text written so
far contains `</think>`; the grammar applies from the next token.
"""
import json
import re
import weakref

import llguidance as llg
import numpy as np

from .errors import TinyhunError
from .kernels.token_mask import apply_token_mask

THINK_END = b"</think>"
# JSON written on one line with the usual separators: no run of free whitespace for a small model to loop in (a
# known failure of flexible-whitespace JSON grammars), and fewer tokens. A schema's own "x-guidance" wins.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json_schema", "json_object", "grammar", "regex", "choice")
_LL = weakref.WeakKeyDictionary()   # Tokenizer -> LLTokenizer (~0.5 s to build for a 49k vocabulary: once each)


def ll_tokenizer(tok, vocab):
    """llguidance's tokenizer for a tinyhun Tokenizer, its mask covering `vocab` logits (the model's row)."""
    lt = _LL.get(tok)
    if lt is None or lt.vocab_size < vocab:
        lt = llg.LLTokenizer(tok.backend_json(), n_vocab=max(tok.vocab_size, vocab), eos_token=sorted(tok.stop_ids))
        _LL[tok] = lt
    return lt


def grammar_text(kind, spec):
    """llguidance's grammar for one constraint: kind json_schema (a dict or its JSON text), json_object (spec
    ignored: any JSON object), grammar (Lark, or llama.cpp's GBNF), regex, or choice (a list of strings)."""
    try:
        if kind == "json_schema":
            if isinstance(spec, str):
                spec = json.loads(spec)
            if not isinstance(spec, dict):
                raise TinyhunError(f"json_schema: expected a JSON object, got {type(spec).__name__}")
            return llg.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
        if kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if kind == "grammar":
            return llg.grammar_from("lark" if _looks_lark(spec) else "gbnf", spec)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            if not (isinstance(spec, list) and spec and all(isinstance(c, str) and c for c in spec)):
                raise TinyhunError("choice: expected a non-empty list of non-empty strings")
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(lark_literal(c) for c in spec))
    except (ValueError, json.JSONDecodeError) as e:
        raise TinyhunError(f"{kind}: {_first_line(e)}") from None
    raise TinyhunError(f"constraint kind {kind!r}: expected one of {', '.join(KINDS)}")


def _looks_lark(text):
    # GBNF writes `rule ::= ...`, Lark `rule: ...`; llguidance takes both, through a converter for GBNF
    return isinstance(text, str) and "::=" not in text


def lark_json(schema):
    """A Lark `%json` item for `schema`, with JSON_OPTIONS unless the schema sets its own."""
    return "%json " + json.dumps({**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}})


def lark_literal(text):
    """A Lark string literal matching exactly `text` (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _first_line(e):
    """llguidance's message on one line, without its excerpt of the grammar (`  1 | ...` and the `^` under it)."""
    lines = [t.strip() for t in str(e).splitlines()]
    text = " ".join(t for t in lines if t and not re.match(r"^(\d+ \||\^)", t))
    return (text[:297] + "...") if len(text) > 300 else text or type(e).__name__


class Grammar:
    """A grammar checked against a model's tokenizer, ready to start matchers (one per sequence)."""

    def __init__(self, tok, vocab, kind, spec=None, text=None):
        self.tok, self.vocab = tok, vocab
        self.text = text if text is not None else grammar_text(kind, spec)
        self.ll = ll_tokenizer(tok, vocab)
        error = llg.LLMatcher.validate_grammar(self.text, self.ll)
        if error:
            raise TinyhunError(f"{kind}: not supported by the constrained decoder: {_first_line(error)}")

    def matcher(self):
        m = llg.LLMatcher(self.ll, self.text, log_level=0)
        if m.is_error():
            raise TinyhunError(f"grammar: {_first_line(m.get_error())}")
        return m


def logit_bias_arrays(bias, vocab):
    """OpenAI's logit_bias ({token id (a string in JSON): -100..100}) as (ids int64[n], values float32[n]);
    -100 bans the token outright (-inf), as OpenAI documents it ("should result in a ban")."""
    if not bias:
        return None
    ids, values = [], []
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise TinyhunError(f"logit_bias: key {key!r} is not a token id") from None
        if not 0 <= token < vocab:
            raise TinyhunError(f"logit_bias: token id {token} out of range [0, {vocab})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise TinyhunError(f"logit_bias[{key}]={value!r}: expected a number in [-100, 100]")
        ids.append(token)
        values.append(-np.inf if value == -100 else float(value))
    return np.asarray(ids, np.int64), np.asarray(values, np.float32)


class Constrained:
    """A Sampler behind a grammar's token mask and/or a logit bias (see the module's doc)."""

    greedy = False   # the row must come down to be masked: never picked on the model's side

    def __init__(self, sampler, grammar=None, bias=None, wait_for=None):
        self.sampler, self.bias = sampler, bias
        self.matcher = grammar.matcher() if grammar is not None else None
        self.ll = grammar.ll if grammar is not None else None
        self.mask = np.empty((grammar.ll.vocab_size + 31) // 32 if grammar else 0, np.int32)
        self.waiting = wait_for is not None and grammar is not None
        self.tail = b""

    def __call__(self, logits, history):
        if self.bias is not None:
            logits[self.bias[0]] += self.bias[1]
        if self.matcher is not None and not self.waiting:
            self.matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
            apply_token_mask(logits, self.mask)
        token = self.sampler(logits, history)
        self.consume(token)
        return token

    def consume(self, token):
        if self.matcher is None:
            return
        if self.waiting:
            self.tail = (self.tail + self.ll.decode_bytes([token]))[-64:]
            self.waiting = THINK_END not in self.tail
            return
        if not self.matcher.consume_token(token) or self.matcher.is_error():
            raise TinyhunError(f"constrained decoding: {_first_line(self.matcher.get_error())}")


def constrained_sampler(sampler, tok, vocab, grammar=None, bias=None, wait_for=None):
    """`sampler` itself when nothing constrains it (no per-token work), else a Constrained around it."""
    if grammar is None and bias is None:
        return sampler
    return Constrained(sampler, grammar, bias, wait_for)


def request_sampler(sampler, tok, vocab, prompt_text, chat, json_schema=None, grammar=None, regex=None,
                    choice=None, logit_bias=None):
    """The sampler of one request given its constraints (at most one of json_schema, grammar, regex, choice)."""
    given = [(k, v) for k, v in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex),
                                 ("choice", choice)) if v is not None]
    if len(given) > 1:
        raise TinyhunError(f"{' and '.join(k for k, _ in given)}: give at most one constraint")
    g = Grammar(tok, vocab, *given[0]) if given else None
    wait = THINK_END if g is not None and chat and reasoning_first(tok, prompt_text) else None
    return constrained_sampler(sampler, tok, vocab, g, logit_bias_arrays(logit_bias, vocab), wait)


def reasoning_first(tok, prompt_text):
    """Whether a reply to this rendered prompt may open with reasoning the constraint must wait out: a thinking
    model (a Hunyuan vocabulary, or a template with an enable_thinking switch) whose prompt does not already end
    with a closed think block (thinking switched off by the template pre-fills an empty one)."""
    from .thinking import thinking_switch
    if thinking_switch(tok) is None:
        return False
    return not re.search(r"</think>\s*$", prompt_text)
