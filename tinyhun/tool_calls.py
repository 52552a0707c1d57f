"""Tool calling: the formats models write calls in, the tools put into a prompt, the calls parsed back out (whole or
as the text streams), and the grammar that forces a call when one is required.

Formats:
- Hunyuan dense (0.5B-7B): `<tool_calls><tool_call>NAME\\n```json\\nARGS\\n```</tool_call>...</tool_calls>`;
  Hunyuan-A13B writes a JSON list inside the same tags, `<tool_calls>[{"name": ..., "arguments": {...}}]
  </tool_calls>`. The parser reads both bodies; a forced call is written in the model's own one.
- Llama 3.1-3.3 (a vocabulary with <|python_tag|>, whose templates render tools themselves): the reply is the
  call, a bare JSON object `{"name": ..., "parameters": {...}}` (several joined by ";"), after an optional
  <|python_tag|>; text before it makes the reply plain text, as vLLM's llama3_json parser reads it.
- Generic, for the other Llama-family models and any other vocabulary: `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`, one block per call (the Hermes/Qwen form, so templates that render tools that way are read
  too).

A template that renders `tools` itself (its output changes with them) gets them as transformers passes them, with
assistant `tool_calls` (arguments as objects) and `role: "tool"` messages; for one that does not (SmolLM2's, the
built-in Hunyuan one) the tools and the format go into a system message, past calls are written back in the
model's format and tool results become user turns wrapped in <tool_response>.

A block that does not parse (bad JSON, an unknown function, no closing tag) comes back as text, never an error.
"""
import json
import re
import uuid

from .constrain import lark_json, lark_literal
from .errors import TinyhunError
from .families.hunyuan_v1_dense import VOCAB_MARKERS as HUNYUAN_MARKERS
from .tokenizer import held_back

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for a function name
CHOICES = ("none", "auto", "required")


def check_tools(tools):
    """OpenAI's tools list -> [{"name", "description", "parameters"}], or TinyhunError naming the bad entry."""
    out = []
    for i, t in enumerate(tools or ()):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not NAME.match(f["name"]):
            raise TinyhunError(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": "
                               "[A-Za-z0-9_-]{1,64}, \"parameters\": {...}}}")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise TinyhunError(f"tools[{i}].function.parameters: expected a JSON schema object")
        out.append({"name": f["name"], "description": f.get("description") or "", "parameters": params})
    if len({t["name"] for t in out}) != len(out):
        raise TinyhunError("tools: two functions share a name")
    return out


def new_call_id():
    return "call_" + uuid.uuid4().hex[:24]


def _call_json(name, arguments):
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def _arguments(value):
    """A call's arguments as an object (OpenAI sends them as a JSON string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise TinyhunError(f"tool_calls: arguments {value[:40]!r} are not JSON") from None
    if not isinstance(value, dict):
        raise TinyhunError("tool_calls: arguments must be a JSON object")
    return value


class Generic:
    name, open, close = "generic", "<tool_call>", "</tool_call>"

    def render(self, calls):
        return "\n".join(f"{self.open}{_call_json(n, a)}{self.close}" for n, a in calls)

    def parse(self, inner):
        obj = _json(inner)
        if not isinstance(obj, dict) or set(obj) - {"name", "arguments", "parameters"}:
            return None
        return [(obj.get("name"), obj.get("arguments", obj.get("parameters", {})))]

    def grammar(self, tools, parallel):
        calls = _alternatives(tools, lambda n: f'{self.open}{{"name": {json.dumps(n)}, "arguments": ', "}" + self.close)
        return ('start: call ("\\n" call)*\n' if parallel else "start: call\n") + calls

    def instructions(self, tools):
        return ("You can call these functions:\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) +
                "\nTo call a function, reply with only " + self.open +
                '{"name": "FUNCTION", "arguments": {...}}' + self.close + " (one such block per call). "
                "Otherwise answer the user directly.")


class LlamaJson:
    """Llama 3.1-3.3's form: the whole reply is the calls (open is None: ToolParser reads it so)."""
    name, open, close = "llama3", None, None
    TAG = "<|python_tag|>"

    def render(self, calls):
        return "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)

    def parse(self, inner):
        text, calls, pos, decoder = inner.strip().removeprefix(self.TAG).strip(), [], 0, json.JSONDecoder()
        while True:
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                return None
            if not isinstance(obj, dict) or set(obj) - {"name", "parameters", "arguments"}:
                return None
            calls.append((obj.get("name"), obj.get("parameters", obj.get("arguments", {}))))
            rest = text[pos:].lstrip()
            if not rest:
                return calls
            if not rest.startswith(";"):
                return None
            pos = len(text) - len(rest[1:].lstrip())

    def may_start(self, text):
        """Whether a reply beginning with `text` may still be calls (ToolParser holds it meanwhile)."""
        s = text.lstrip()
        rest = s.removeprefix(self.TAG).lstrip()
        return self.TAG.startswith(s) or rest == "" or rest.startswith("{")

    def grammar(self, tools, parallel):
        calls = _alternatives(tools, lambda n: f'{{"name": {json.dumps(n)}, "parameters": ', "}")
        return ('start: call ("; " call)*\n' if parallel else "start: call\n") + calls

    def instructions(self, tools):
        return ("You can call these functions:\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) +
                '\nTo call a function, reply with only {"name": "FUNCTION", "parameters": {...}} (several calls '
                'joined by "; "). Otherwise answer the user directly.')


class Hunyuan:
    """The dense models' form when rendering and forcing calls (list=True: A13B's JSON list); reads both."""
    name, open, close = "hunyuan", "<tool_calls>", "</tool_calls>"
    CALL = re.compile(r"\s*<tool_call>([A-Za-z0-9_-]{1,64})\s*```(?:json)?\s*(.*?)\s*```\s*</tool_call>\s*", re.S)

    def __init__(self, list_form=False):
        self.list_form = list_form

    def render(self, calls):
        if self.list_form:
            return self.open + json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=False) + \
                self.close
        return self.open + "".join(f"<tool_call>{n}\n```json\n{json.dumps(a, ensure_ascii=False)}\n```</tool_call>"
                                   for n, a in calls) + self.close

    def parse(self, inner):
        if inner.lstrip().startswith("["):
            items = _json(inner)
            if not isinstance(items, list) or not items or not all(isinstance(c, dict) for c in items):
                return None
            return [(c.get("name"), c.get("arguments", {})) for c in items]
        calls, pos = [], 0
        while pos < len(inner):
            m = self.CALL.match(inner, pos)
            if m is None:
                return None
            calls.append((m.group(1), _json(m.group(2))))
            pos = m.end()
        return calls or None

    def grammar(self, tools, parallel):
        if self.list_form:
            calls = _alternatives(tools, lambda n: f'{{"name": {json.dumps(n)}, "arguments": ', "}")
            return ('start: "<tool_calls>[" call ' + ('(", " call)* ' if parallel else "") + '"]</tool_calls>"\n'
                    + calls)
        calls = _alternatives(tools, lambda n: f"<tool_call>{n}\n```json\n", "\n```</tool_call>")
        return f'start: "<tool_calls>" call{"+" if parallel else ""} "</tool_calls>"\n' + calls

    def instructions(self, tools):
        example = self.render([("FUNCTION", {"ARGUMENT": "VALUE"})])
        return ("You can call these functions:\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) +
                f"\nTo call functions, reply with only {example} (one entry per call). "
                "Otherwise answer the user directly.")


def _alternatives(tools, prefix, suffix):
    """Lark rules `call: c0 | c1 ...`, each ci the fixed text around tool i's arguments (its parameters' schema)."""
    rules = [f"c{i}: {lark_literal(prefix(t['name']))} {lark_json(t['parameters'])} {lark_literal(suffix)}"
             for i, t in enumerate(tools)]
    return "call: " + " | ".join(f"c{i}" for i in range(len(tools))) + "\n" + "\n".join(rules) + "\n"


def _json(text):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def format_for(tok, moe=False):
    """The tool-call format of a model: Hunyuan's for a Hunyuan vocabulary (A13B's list form for a MoE model),
    Llama 3's bare JSON for a vocabulary with <|python_tag|>, else the generic one."""
    if any(len(tok.encode(m, add_special_tokens=False)) == 1 for m in HUNYUAN_MARKERS):
        return Hunyuan(list_form=moe)
    if len(tok.encode(LlamaJson.TAG, add_special_tokens=False)) == 1:
        return LlamaJson()
    return Generic()


def template_renders_tools(tok):
    probe = [{"role": "user", "content": "hi"}]
    tool = [{"type": "function", "function": {"name": "probe_tool", "description": "", "parameters": {}}}]
    try:
        return tok.render_chat(probe, tools=tool) != tok.render_chat(probe)
    except TinyhunError:
        return False


def prompt_messages(tok, fmt, messages, tools):
    """(messages, template variables) for a conversation with tools (tools=None: no tools offered, past calls and
    results still rendered). messages: dicts with role, content, and tool_calls (OpenAI's shape) / tool_call_id."""
    if template_renders_tools(tok):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{"id": c.get("id"), "type": "function",
                                    "function": {"name": c["function"]["name"],
                                                 "arguments": _arguments(c["function"].get("arguments"))}}
                                   for c in m["tool_calls"]]
            out.append(m)
        variables = {"tools": [{"type": "function", "function": t} for t in tools]} if tools else {}
        return out, variables
    out = [{"role": "system", "content": fmt.instructions(tools)}] if tools else []
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_result"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "tool_result": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [(c["function"]["name"], _arguments(c["function"].get("arguments"))) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": (m.get("content") or "") + fmt.render(calls)})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    return [{k: v for k, v in m.items() if k != "tool_result"} for m in out], {}


class ToolParser:
    """Content text in, (content delta, completed calls) out; calls are (id, name, arguments JSON string).
    Text that may start the format's opening tag is held back; a block is held until it closes, then released
    as calls or, when it does not parse, as the text it was. The result does not depend on how text is split."""

    def __init__(self, fmt, tools, parallel=True):
        self.fmt, self.names, self.parallel = fmt, {t["name"] for t in tools}, parallel
        self.buf, self.inside, self.calls = "", False, 0
        self.text = False   # a whole-reply format (open is None) whose reply turned out to be text

    def push(self, text):
        self.buf += text
        if self.fmt.open is None:   # the reply is the calls: held while it may be, else released as text
            if self.text or not self.fmt.may_start(self.buf):
                out, self.buf, self.text = self.buf, "", True
                return out, []
            return "", []
        out, calls = [], []
        while True:
            if not self.inside:
                i = self.buf.find(self.fmt.open)
                if i < 0:
                    keep = held_back(self.buf, [self.fmt.open])
                    out.append(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                out.append(self.buf[:i])
                self.buf, self.inside = self.buf[i:], True
            j = self.buf.find(self.fmt.close)
            if j < 0:
                break
            block, self.buf, self.inside = self.buf[:j + len(self.fmt.close)], self.buf[j + len(self.fmt.close):], False
            parsed = self._parse(block)
            if parsed is None:
                out.append(block)
            else:
                calls.extend(parsed)
        return "".join(out), calls

    def flush(self):
        if self.fmt.open is None:
            block, self.buf = self.buf, ""
            parsed = None if self.text or not block.strip() else self._parse(block)
            return ("", parsed) if parsed is not None else (block, [])
        text, calls = self.push("")
        text, self.buf, self.inside = text + self.buf, "", False
        return text, calls

    def _parse(self, block):
        inner = block if self.fmt.open is None else block[len(self.fmt.open):len(block) - len(self.fmt.close)]
        parsed = self.fmt.parse(inner)
        if not parsed or any(n not in self.names or not isinstance(a, dict) for n, a in parsed):
            return None
        if not self.parallel:
            parsed = parsed[:max(0, 1 - self.calls)]
        self.calls += len(parsed)
        return [(new_call_id(), n, json.dumps(a, ensure_ascii=False)) for n, a in parsed]


def parse_all(fmt, tools, text, parallel=True):
    """(content, calls) of a whole reply."""
    p = ToolParser(fmt, tools, parallel)
    a, calls = p.push(text)
    b, more = p.flush()
    return a + b, calls + more


def forced_tools(tools, tool_choice):
    """The tools a call is forced among (required: all; a named function: that one), or None (none/auto)."""
    if tool_choice in (None, "none", "auto"):
        return None
    if tool_choice == "required":
        return tools
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    chosen = [t for t in tools if t["name"] == name]
    if not chosen:
        raise TinyhunError(f"tool_choice: function {name!r} is not among the tools")
    return chosen
