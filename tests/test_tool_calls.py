"""Tool calls without a model: the Hunyuan and generic parsers on hand-written replies, whole and split at every
character as a stream delivers them (hypothesis for the splits), badly written calls coming back as text, past
calls rendered back in the model's format, and the forcing grammars accepting exactly the calls the parser reads."""
import json

import jsonschema
import llguidance as llg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import ROOT
from tinyhun import tool_calls as tc
from tinyhun.constrain import Grammar
from tinyhun.errors import TinyhunError
from tinyhun.tokenizer import Tokenizer

TOOLS = tc.check_tools([
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "lookup_order", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"]}}},
])
HY = tc.Hunyuan()
LL = tc.LlamaJson()

# (reply as the model writes it, content expected, [(name, arguments)] expected)
REPLIES = [
    (HY, "<tool_calls><tool_call>get_weather\n```json\n{\"city\": \"Paris\"}\n```</tool_call></tool_calls>", "",
     [("get_weather", {"city": "Paris"})]),
    (HY, "Let me check.\n<tool_calls>\n<tool_call>get_weather\n```json\n{\"city\": \"北京\", \"unit\": \"c\"}\n```"
         "</tool_call>\n<tool_call>lookup_order\n```json\n{\"order_id\": 42}\n```</tool_call>\n</tool_calls>",
     "Let me check.\n", [("get_weather", {"city": "北京", "unit": "c"}), ("lookup_order", {"order_id": 42})]),
    (HY, '<tool_calls>[{"name": "lookup_order", "arguments": {"order_id": 7}}]</tool_calls>', "",   # A13B
     [("lookup_order", {"order_id": 7})]),
    (HY, "No tools needed: it is <b>sunny</b> <tool_call>.", "No tools needed: it is <b>sunny</b> <tool_call>.", []),
    # badly written calls come back as text
    (HY, "<tool_calls><tool_call>get_weather\n```json\n{\"city\": Paris}\n```</tool_call></tool_calls>",
     "<tool_calls><tool_call>get_weather\n```json\n{\"city\": Paris}\n```</tool_call></tool_calls>", []),
    (HY, "<tool_calls><tool_call>delete_all\n```json\n{}\n```</tool_call></tool_calls>",
     "<tool_calls><tool_call>delete_all\n```json\n{}\n```</tool_call></tool_calls>", []),
    (HY, "<tool_calls><tool_call>get_weather\n```json\n{\"city\": \"Pa", "<tool_calls><tool_call>get_weather\n```json\n"
                                                                      "{\"city\": \"Pa", []),   # cut by max_tokens
    (tc.Generic(), 'Sure <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
                   '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": 3}}\n</tool_call>', "Sure \n",
     [("get_weather", {"city": "Oslo"}), ("lookup_order", {"order_id": 3})]),
    (tc.Generic(), '<tool_call>{"name": "get_weather", "arguments": "Oslo"}</tool_call>',
     '<tool_call>{"name": "get_weather", "arguments": "Oslo"}</tool_call>', []),
    # Llama 3.1-3.3: the reply is the calls, bare JSON, after an optional <|python_tag|>
    (LL, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    (LL, '<|python_tag|>{"name": "lookup_order", "parameters": {"order_id": 3}}; '
         '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "c"}}\n', "",
     [("lookup_order", {"order_id": 3}), ("get_weather", {"city": "Rome", "unit": "c"})]),
    (LL, 'Here: {"name": "get_weather", "parameters": {"city": "Oslo"}}',
     'Here: {"name": "get_weather", "parameters": {"city": "Oslo"}}', []),   # text first: an answer, not a call
    (LL, '{"city": "Oslo", "temperature": 3}', '{"city": "Oslo", "temperature": 3}', []),   # JSON, not a call
    (LL, '{"name": "get_weather", "parameters": {"city": "Oslo"}} and more',
     '{"name": "get_weather", "parameters": {"city": "Oslo"}} and more', []),
    (LL, '{"name": "get_weather", "parameters": {"city": "Os', '{"name": "get_weather", "parameters": {"city": "Os',
     []),   # cut by max_tokens
    (LL, "<|python", "<|python", []),
]


def _calls(calls):
    return [(name, json.loads(args)) for _, name, args in calls]


@pytest.mark.parametrize("fmt, reply, content, calls", REPLIES)
def test_whole_replies(fmt, reply, content, calls):
    text, got = tc.parse_all(fmt, TOOLS, reply)
    assert (text, _calls(got)) == (content, calls)
    assert all(call_id.startswith("call_") for call_id, _, _ in got)


@pytest.mark.parametrize("fmt, reply, content, calls", REPLIES)
def test_split_at_every_character(fmt, reply, content, calls):
    for cut in range(len(reply) + 1):
        p = tc.ToolParser(fmt, TOOLS)
        a, c1 = p.push(reply[:cut])
        b, c2 = p.push(reply[cut:])
        d, c3 = p.flush()
        assert (a + b + d, _calls(c1 + c2 + c3)) == (content, calls), cut


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_split_into_pieces(data):
    fmt, reply, content, calls = data.draw(st.sampled_from(REPLIES))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(reply)), max_size=12)))
    p, text, got = tc.ToolParser(fmt, TOOLS), "", []
    for lo, hi in zip([0] + cuts, cuts + [len(reply)]):
        t, c = p.push(reply[lo:hi])
        text, got = text + t, got + c
    t, c = p.flush()
    assert (text + t, _calls(got + c)) == (content, calls)


def test_parallel_off_keeps_the_first_call():
    text, got = tc.parse_all(HY, TOOLS, REPLIES[1][1], parallel=False)
    assert _calls(got) == [("get_weather", {"city": "北京", "unit": "c"})]


@pytest.mark.parametrize("bad, message", [
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0]"),
    ([{"type": "retrieval"}], "tools[0]"),
    ([{"type": "function", "function": {"name": "a", "parameters": []}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "a"}}] * 2, "share a name"),
])
def test_bad_tools(bad, message):
    with pytest.raises(TinyhunError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tc.check_tools(bad)


def test_tool_choice():
    assert tc.forced_tools(TOOLS, "auto") is None and tc.forced_tools(TOOLS, "none") is None
    assert tc.forced_tools(TOOLS, "required") == TOOLS
    assert tc.forced_tools(TOOLS, {"type": "function", "function": {"name": "lookup_order"}}) == TOOLS[1:]
    with pytest.raises(TinyhunError, match="'nope' is not among the tools"):
        tc.forced_tools(TOOLS, {"type": "function", "function": {"name": "nope"}})


@pytest.fixture(scope="module")
def hy_tok():
    return Tokenizer.from_dir(ROOT / "weights" / "tiny-hunyuan")


def test_hunyuan_conversation_renders_calls_and_results(hy_tok):
    assert isinstance(tc.format_for(hy_tok), tc.Hunyuan) and tc.format_for(hy_tok, moe=True).list_form
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "windy"}]
    msgs, variables = tc.prompt_messages(hy_tok, HY, messages, TOOLS)
    text = hy_tok.render_chat(msgs, **variables)
    assert '"name": "get_weather"' in text.split("<｜hy_User｜>")[0]          # the tools, in the system prompt
    assert ("<｜hy_Assistant｜><tool_calls><tool_call>get_weather\n```json\n{\"city\": \"Paris\"}\n```</tool_call>"
            "</tool_calls><｜hy_place▁holder▁no▁2｜>") in text
    assert "<｜hy_User｜><tool_response>\nsunny\n</tool_response>\n<tool_response>\nwindy\n</tool_response>" in text


@pytest.mark.parametrize("fmt", [tc.Hunyuan(), tc.Hunyuan(list_form=True), tc.Generic(), tc.LlamaJson()],
                         ids=["hunyuan", "a13b", "generic", "llama3"])
@pytest.mark.parametrize("parallel", [True, False])
def test_forcing_grammar_accepts_what_the_parser_reads(hy_tok, fmt, parallel):
    calls = [("get_weather", {"city": "Oslo", "unit": "f"}), ("lookup_order", {"order_id": 9})][:2 if parallel else 1]
    text = fmt.render(calls)
    g = Grammar(hy_tok, hy_tok.vocab_size, "tools", text=llg.LLMatcher.grammar_from_lark(fmt.grammar(TOOLS, parallel)))
    m = g.matcher()
    assert m.consume_tokens(hy_tok.encode(text, add_special_tokens=False)) and m.is_accepting(), m.get_error()
    assert _calls(tc.parse_all(fmt, TOOLS, text)[1]) == calls
    bad = fmt.render([("get_weather", {"town": "Oslo"})])       # arguments off the schema: refused
    m = g.matcher()
    assert not (m.consume_tokens(hy_tok.encode(bad, add_special_tokens=False)) and m.is_accepting())
    for name, args in calls:
        jsonschema.validate(args, next(t["parameters"] for t in TOOLS if t["name"] == name))


class _Vocab:
    """A tokenizer's encode as format_for asks it: one token for each of `specials`, a token per character else."""

    def __init__(self, *specials):
        self.specials = specials

    def encode(self, text, add_special_tokens=False):
        return [0] if text in self.specials else list(text)


def test_format_follows_the_vocabulary():
    assert isinstance(tc.format_for(_Vocab("<|python_tag|>", "<|eot_id|>")), tc.LlamaJson)   # Llama 3.x
    assert isinstance(tc.format_for(_Vocab("<|im_end|>")), tc.Generic)                        # SmolLM2, Qwen, ...
    assert isinstance(tc.format_for(_Vocab(*tc.HUNYUAN_MARKERS)), tc.Hunyuan)


def test_chat_tries_tools_by_hand():
    """`tinyhun chat --tools`: the tools go into the prompt, a call's result typed by the user into the next."""
    import tinyhun
    from tinyhun.chat import Conversation, ask_results

    tools = [{"type": "function", "function": t} for t in TOOLS]
    conv = Conversation(tinyhun.load(ROOT / "weights" / "tiny-hunyuan"), think=False, temperature=0,
                        max_tokens=4, tools=tools)
    prompt, _, _ = conv._prompt("Where is order 5?")
    assert '"name": "lookup_order"' in prompt[0]["content"]
    list(conv.reply("Where is order 5?"))
    conv.calls = [("call_1", "lookup_order", '{"order_id": 5}')]     # as if the reply had made it

    class Typed:
        def prompt(self, text):
            assert text == "result of lookup_order> "
            return "shipped yesterday"

    class Term:
        lines = []

        def line(self, text, dim=False):
            self.lines.append(text)
    ask_results(conv, Term(), Typed())
    assert Term.lines == ['(tool call lookup_order({"order_id": 5}))'] and conv.calls == []
    prompt, variables, _ = conv._prompt(None)
    text = conv.model.tokenizer.render_chat(prompt, **variables)
    assert "<｜hy_User｜><tool_response>\nshipped yesterday\n</tool_response><｜hy_Assistant｜>" in text
    assert len(list(conv.reply(None))) >= 1
