"""Constrained decoding in the library: the token-mask kernel against its NumPy reference, generate and
stream_generate under a JSON schema (the default model, outputs validated with jsonschema), Lark / GBNF / regex /
choice on the tiny checkpoint, logit_bias, a thinking model's reasoning left free until </think>, and the errors."""
import json
import re
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyhun
from oracle import ROOT
from tinyhun.constrain import Constrained, Grammar, constrained_sampler
from tinyhun.errors import TinyhunError
from tinyhun.kernels.token_mask import apply_token_mask, apply_token_mask_ref
from tinyhun.sampling import make_sampler

TINY = ROOT / "weights" / "tiny-hunyuan"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": False}


@settings(max_examples=80, deadline=None)
@given(vocab=st.integers(1, 200), extra_words=st.integers(-2, 2), seed=st.integers(0, 2**32 - 1),
       density=st.sampled_from([0.0, 0.02, 0.5, 0.98, 1.0]))
def test_token_mask_kernel_equals_reference(vocab, extra_words, seed, density):
    rng = np.random.default_rng(seed)
    words = max(1, (vocab + 31) // 32 + extra_words)   # a mask shorter or longer than the row
    bits = rng.random(words * 32) < density
    mask = np.packbits(bits, bitorder="little").view(np.int32)
    logits = rng.standard_normal(vocab).astype(np.float32)
    want, got = logits.copy(), logits.copy()
    apply_token_mask_ref(want, mask)
    apply_token_mask(got, mask)
    np.testing.assert_array_equal(got, want)
    allowed = bits[:vocab] if bits.size >= vocab else np.r_[bits, np.zeros(vocab - bits.size, bool)]
    assert np.array_equal(np.isfinite(got), allowed)


@pytest.fixture(scope="module")
def smol(smollm2_q4_dir):
    return tinyhun.load(smollm2_q4_dir, max_context=512)


@pytest.fixture(scope="module")
def tiny():
    return tinyhun.load(TINY)


def ask(**kw):
    return [{"role": "user", "content": "Describe a person as JSON."}]


def test_generate_follows_a_json_schema(smol):
    text = "".join(tinyhun.generate(smol, ask(), json_schema=SCHEMA, max_tokens=60))
    jsonschema.validate(json.loads(text), SCHEMA)
    steps = list(tinyhun.stream_generate(smol, ask(), json_schema=json.dumps(SCHEMA), max_tokens=60, temperature=1.0,
                                         seed=5))
    assert steps[-1].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(s.text for s in steps)), SCHEMA)


def test_a_constraint_cut_by_max_tokens_says_length(smol):
    steps = list(tinyhun.stream_generate(smol, ask(), json_schema=SCHEMA, max_tokens=4))
    assert steps[-1].finish_reason == "length" and len(steps) == 4


@pytest.mark.parametrize("kw, check", [
    (dict(regex=r"[0-9]{3}-[0-9]{4}"), lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
    (dict(choice=["yes", "no", "maybe"]), lambda t: t in ("yes", "no", "maybe")),
    (dict(grammar='start: "ok" | "id=" NUM\nNUM: /[1-9][0-9]{0,2}/'), lambda t: re.fullmatch(r"ok|id=[1-9]\d{0,2}", t)),
    (dict(grammar='root ::= "a" [0-9] [0-9]? "z"'), lambda t: re.fullmatch(r"a\d\d?z", t)),   # GBNF
])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammars_on_random_weights(tiny, kw, check, temperature):
    text = "".join(tinyhun.generate(tiny, "x", chat=False, max_tokens=20, temperature=temperature, seed=1, **kw))
    assert check(text), text


def test_logit_bias(tiny):
    free = [s.token for s in tinyhun.stream_generate(tiny, "x", chat=False, max_tokens=12)]
    banned = {str(t): -100 for t in free}
    again = [s.token for s in tinyhun.stream_generate(tiny, "x", chat=False, max_tokens=12, logit_bias=banned)]
    assert not set(again) & set(free)
    forced = [s.token for s in tinyhun.stream_generate(tiny, "x", chat=False, max_tokens=6, temperature=1.0, seed=3,
                                                       logit_bias={"77": 100})]
    assert forced == [77] * 6


@pytest.mark.parametrize("kw, message", [
    (dict(logit_bias={"99999": 5}), "logit_bias: token id 99999 out of range"),
    (dict(logit_bias={"3": 101}), r"logit_bias\[3\]=101: expected a number in \[-100, 100\]"),
    (dict(logit_bias={"x": 1}), "logit_bias: key 'x' is not a token id"),
    (dict(regex="a", choice=["b"]), "regex and choice: give at most one constraint"),
    (dict(json_schema={"type": "object", "if": {}}), r'json_schema: not supported .*Unimplemented keys: \["if"\]'),
    (dict(json_schema="{not json"), "json_schema: "),
    (dict(grammar="start: nothing_here"), 'grammar: not supported .*unknown name: "nothing_here"'),
    (dict(regex="a(b"), "regex: not supported .*unclosed group"),
    (dict(choice=[]), "choice: expected a non-empty list"),
])
def test_bad_constraints(tiny, kw, message):
    with pytest.raises(TinyhunError, match=message):
        list(tinyhun.generate(tiny, "x", chat=False, max_tokens=2, **kw))


def test_no_constraint_keeps_the_plain_sampler(tiny):
    s = make_sampler()
    assert constrained_sampler(s, tiny.tokenizer, tiny.config.vocab_size) is s


def test_reasoning_is_free_until_think_closes(tiny):
    """The constraint waits for </think> when the prompt leaves the think block to the model."""
    tok = tiny.tokenizer
    script = (tok.encode("<think>\nlet me see\n</think>", add_special_tokens=False)
              + tok.encode("no", add_special_tokens=False))
    seen = []

    def scripted(logits, history):
        seen.append(np.isfinite(logits).all())
        return script[len(seen) - 1]

    g = Grammar(tok, tiny.config.vocab_size, "choice", ["yes", "no"])
    c = Constrained(scripted, g, wait_for=b"</think>")
    for _ in script:
        c(np.zeros(tiny.config.vocab_size, np.float32), [])
    n_think = len(script) - len(tok.encode("no", add_special_tokens=False))
    assert seen[:n_think] == [True] * n_think and not any(seen[n_think:])
    assert c.matcher.is_accepting()
    # a chat reply to a thinking model's prompt waits; with thinking switched off (the template closes the block
    # in the prompt) the constraint starts at once
    on = "".join(tinyhun.generate(tiny, "hi", choice=["yes", "no"], max_tokens=6, chat_template_kwargs=None))
    off = "".join(tinyhun.generate(tiny, "hi", choice=["yes", "no"], max_tokens=6,
                                   chat_template_kwargs={"enable_thinking": False}))
    assert off in ("yes", "no") and on not in ("yes", "no")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tinyhun.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_generate_json_schema(tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    r = _cli("generate", "x", "--model", str(TINY), "--raw", "--quiet", "--json-schema", str(tmp_path / "s.json"),
             "--max-tokens", "40")
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), schema)
    (tmp_path / "bad.json").write_text('{"type": "object", "if": {}}')
    r = _cli("generate", "x", "--model", str(TINY), "--raw", "--quiet", "--json-schema", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert 'Unimplemented keys: ["if"]' in r.stderr.strip().splitlines()[-1]
