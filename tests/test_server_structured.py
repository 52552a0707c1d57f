"""Structured output and tools through the real openai client against a live `tinyhun serve` on 127.0.0.1:
response_format json_object / json_schema (outputs validated with jsonschema), a schema the decoder cannot compile
(400 naming the keyword), tools under auto / required / a named function / none, a two-turn tool round trip,
streamed tool-call deltas reassembled equal to the whole answer, logit_bias, n = 3, and constrained batching
equal to the library's single stream.

Most run on the tiny random checkpoint (a constraint holds whatever the weights; thinking is switched off so the
answer starts at once), a few on the default model, where a prompt's answer is also meaningful."""
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

import tinyhun
from live_server import LiveServer
from oracle import ROOT

TINY = ROOT / "weights" / "tiny-hunyuan"
NO_THINK = {"think": False}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
    "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "lookup_order", "description": "Find an order by its number",
                                      "parameters": {"type": "object", "properties": {
                                          "order_id": {"type": "integer", "minimum": 1, "maximum": 9999}},
                                          "required": ["order_id"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "book_return", "description": "Book the return of an order",
                                      "parameters": {"type": "object", "properties": {
                                          "order_id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                          "reason": {"enum": ["broken", "late", "other"]}},
                                          "required": ["order_id", "reason"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Where is my order 12?"}]


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY)


@pytest.fixture(scope="module")
def client(model):
    s = LiveServer(model, max_tokens=256, max_context=2048, slots=4, queue=8)
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    s.close()


def create(client, **kw):
    kw.setdefault("messages", ASK)
    return client.chat.completions.create(model="tiny", extra_body=NO_THINK, **kw)


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_json_schema_strict_sampled_outputs_validate(client):
    r = create(client, response_format=schema_format(PERSON), temperature=1.0, seed=11, n=3, max_tokens=128)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)
    assert len({c.message.content for c in r.choices}) > 1    # each choice its own sampler
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_json_cut_by_max_tokens_says_length(client):
    r = create(client, response_format=schema_format(PERSON), max_tokens=3)
    assert r.choices[0].finish_reason == "length"


def test_a_schema_the_decoder_cannot_compile_is_a_400(client):
    bad = {"type": "object", "properties": {"a": {"type": "string"}}, "if": {"required": ["a"]}}
    with pytest.raises(openai.BadRequestError) as e:
        create(client, response_format=schema_format(bad), max_tokens=4)
    assert 'Unimplemented keys: ["if"]' in e.value.message and "response_format.json_schema.schema" in e.value.message


@pytest.mark.parametrize("extra, check", [
    ({"regex": "[A-Z]{2}-[0-9]{3}"}, lambda t: len(t) == 6 and t[2] == "-"),
    ({"choice": ["refund", "exchange"]}, lambda t: t in ("refund", "exchange")),
    ({"grammar": 'start: "order " /[0-9]{2}/'}, lambda t: t.startswith("order ") and t[6:].isdigit()),
])
def test_extensions(client, extra, check):
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=12, extra_body={**NO_THINK, **extra})
    assert check(r.choices[0].message.content), r.choices[0].message.content


def _check_call(call, names=PARAMS):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


# Random weights may go on adding calls while the grammar allows more: one call each here (parallel_tool_calls
# false); the default model's test below lets it choose.
ONE = dict(parallel_tool_calls=False, max_tokens=256)


@pytest.mark.parametrize("seed", [2, 3])
def test_tool_choice_required(client, seed):
    r = create(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, **ONE)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1 and c.message.content is None
    _check_call(c.message.tool_calls[0])


def test_tool_choice_named(client):
    r = create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "book_return"}}, **ONE)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["book_return"]
    _check_call(calls[0])


def test_tool_choice_auto_and_none_answer_text(client):
    for choice in ("auto", "none"):   # random weights write no well-formed call: it comes back as text
        r = create(client, tools=TOOLS, tool_choice=choice, max_tokens=16)
        assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_a_bad_tool_choice_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="'nope' is not among the tools"):
        create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="tool_choice: needs tools"):
        create(client, tool_choice="required", max_tokens=4)


def test_streamed_tool_calls_reassemble_to_the_whole_answer(client):
    kw = dict(tools=TOOLS, tool_choice="required", temperature=0.8, seed=4, **ONE)
    whole = create(client, **kw).choices[0]
    calls, finish = {}, None
    for chunk in create(client, stream=True, **kw):
        for d in chunk.choices[0].delta.tool_calls or ():
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or d.id
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_two_turn_tool_round_trip(client, model):
    first = create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "lookup_order"}}, **ONE)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'}]
    second = create(client, messages=history, tools=TOOLS, max_tokens=12, temperature=0)
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content
    # the call and its result went into the prompt
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10


def test_logit_bias(client):
    free = create(client, max_tokens=8, temperature=0, logprobs=True)
    seen = {e.token for e in free.choices[0].logprobs.content}
    tok = tinyhun.load(TINY).tokenizer
    banned = {t for t in range(tok.vocab_size) if tok.decode([t], skip_special_tokens=False) in seen}
    again = create(client, max_tokens=8, temperature=0, logprobs=True, logit_bias={str(t): -100 for t in banned})
    assert not {e.token for e in again.choices[0].logprobs.content} & seen
    forced = create(client, max_tokens=5, temperature=1.0, seed=1, logit_bias={"77": 100})
    assert forced.choices[0].message.content == tok.decode([77] * 5)
    with pytest.raises(openai.BadRequestError, match="out of range"):
        create(client, max_tokens=2, logit_bias={"100000": 1})


def test_n_choices_stream(client):
    chunks = list(create(client, max_tokens=6, temperature=1.0, seed=5, n=3, stream=True,
                         stream_options={"include_usage": True}))
    text = {}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] = text.get(ch.index, "") + (ch.delta.content or "")
    whole = create(client, max_tokens=6, temperature=1.0, seed=5, n=3)
    assert text == {c.index: c.message.content for c in whole.choices}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 18


def test_constrained_batch_equals_the_library_alone(client, model):
    prompts = ["Order 1?", "Order 22?", "Refund please", "Where is my parcel?"]
    alone = ["".join(tinyhun.generate(model, [{"role": "user", "content": p}], json_schema=PERSON, max_tokens=128,
                                      chat_template_kwargs={"enable_thinking": False})) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        batched = list(pool.map(lambda p: create(client, messages=[{"role": "user", "content": p}],
                                                 response_format=schema_format(PERSON), max_tokens=128,
                                                 temperature=0).choices[0].message.content, prompts))
    assert batched == alone


# ---- the default model: real answers ----

@pytest.fixture(scope="module")
def smol_client(smollm2_q4_dir):
    s = LiveServer(tinyhun.load(smollm2_q4_dir, max_context=512), name="smollm2", slots=2, queue=4, max_tokens=48)
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    s.close()


@pytest.mark.slow
def test_default_model_json_object_and_a_forced_call(smol_client):
    r = smol_client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Give the city and country of Paris as JSON."}],
        response_format={"type": "json_object"}, max_tokens=32, temperature=0)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = smol_client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=48, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    _check_call(call)
    assert (call.function.name, json.loads(call.function.arguments)["order_id"]) == ("lookup_order", 12)
