"""What a request asks of the decoder beyond sampling: a constraint (response_format, or the grammar / regex /
choice / json_schema extensions), logit_bias, and tools (offered in the prompt, a call forced by a grammar built on
their parameters under tool_choice required or a named function, the calls parsed out of the reply).

Constraints are compiled once per request, checked against the model's tokenizer (an unsupported schema keyword is
a 400 naming it), off the event loop; each choice of the request then gets its own matcher.
"""
import asyncio
from dataclasses import dataclass

import llguidance as llg

from .. import tool_calls
from ..constrain import THINK_END, Constrained, Grammar, logit_bias_arrays, reasoning_first
from ..errors import TinyhunError
from .schemas import ApiError


@dataclass
class Tools:
    fmt: object
    tools: list
    parallel: bool
    forced: list | None     # the tools a call is forced among (required / named), else None
    offered: bool           # False under tool_choice none: no tools in the prompt, no calls parsed

    def parser(self):
        return tool_calls.ToolParser(self.fmt, self.tools, self.parallel) if self.offered else None


def tools_of(server, req):
    """The request's Tools, or None when it has none."""
    if not req.tools:
        if req.tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice: needs tools", param="tool_choice")
        return None
    try:
        tools = tool_calls.check_tools(req.tools)
        forced = tool_calls.forced_tools(tools, req.tool_choice)
    except TinyhunError as e:
        raise ApiError(400, str(e), param="tools" if str(e).startswith("tools") else "tool_choice") from None
    model = server.model
    fmt = tool_calls.format_for(model.tokenizer, "moe" in getattr(model.config, "model_type", ""))
    return Tools(fmt, tools, req.parallel_tool_calls, forced, req.tool_choice != "none")


def _constraint(req):
    """(param, kind, spec) of the request's one constraint, or None."""
    given = []
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.type == "json_object":
        given.append(("response_format", "json_object", None))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise ApiError(400, "response_format.json_schema: required when type is json_schema",
                           param="response_format.json_schema")
        given.append(("response_format.json_schema.schema", "json_schema", rf.json_schema.schema_))
    for field in ("json_schema", "grammar", "regex", "choice"):
        if getattr(req, field) is not None:
            given.append((field, field, getattr(req, field)))
    if len(given) > 1:
        raise ApiError(400, f"{given[0][0]} and {given[1][0]}: give at most one constraint", param=given[1][0])
    return given[0] if given else None


async def sampler_wrap(server, req, prompt_text, chat, tools=None):
    """A function sampler -> sampler that puts each choice's sampler behind the request's constraint and bias,
    or None when the request has neither (its samplers stay plain: no per-token work)."""
    model = server.model
    tok, vocab = model.tokenizer, model.config.vocab_size
    try:
        bias = logit_bias_arrays(req.logit_bias, vocab)
    except TinyhunError as e:
        raise ApiError(400, str(e), param="logit_bias") from None
    wanted = _constraint(req)
    if tools is not None and tools.forced is not None:
        if wanted is not None:
            raise ApiError(400, f"{wanted[0]}: cannot be combined with tool_choice {req.tool_choice!r}",
                           param=wanted[0])
        lark = tools.fmt.grammar(tools.forced, tools.parallel)
        wanted = ("tools", "tools", llg.LLMatcher.grammar_from_lark(lark))
    if wanted is None and bias is None:
        return None
    grammar = None
    if wanted is not None:
        param, kind, spec = wanted
        try:
            grammar = await asyncio.to_thread(
                lambda: Grammar(tok, vocab, kind, text=spec) if kind == "tools" else Grammar(tok, vocab, kind, spec))
        except TinyhunError as e:
            raise ApiError(400, f"{param}: {str(e).split(': ', 1)[-1]}", param=param) from None
    wait = THINK_END if grammar is not None and chat and reasoning_first(tok, prompt_text) else None
    return lambda sampler: Constrained(sampler, grammar, bias, wait)
