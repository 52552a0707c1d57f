"""What the server puts around the model on the chat endpoint: the prompt (a style's system prompt, thinking on or
off, the content filter on the user's words) and the Output a reply's text goes through (the thinking split out as
reasoning_content, blocked terms masked in both parts however the tokens split them).

/v1/completions is the raw model (evaluation harnesses score text through it): no style, no split, no filter.
"""
from dataclasses import dataclass

from ..content_filter import REFUSAL
from ..errors import TinyhunError
from ..styles import DEFAULT_TEMPERATURE, system_prompt
from ..thinking import THINK_OPEN, ThinkSplitter, think_prompt_args
from .schemas import ApiError

__all__ = ["DEFAULT_TEMPERATURE", "ChatPrompt", "Output", "chat_prompt", "plain"]


class Output:
    """Text deltas in, (reasoning delta, content delta) out."""

    def __init__(self, splitter=None, content_filter=None):
        self.splitter = splitter
        self.masks = None if content_filter is None else (content_filter.stream(), content_filter.stream())

    def push(self, text):
        parts = self.splitter.push(text) if self.splitter else ("", text)
        return parts if self.masks is None else tuple(m.push(p) for m, p in zip(self.masks, parts))

    def flush(self):
        parts = self.splitter.flush() if self.splitter else ("", "")
        return parts if self.masks is None else tuple(m.push(p) + m.flush() for m, p in zip(self.masks, parts))


@dataclass
class ChatPrompt:
    text: str
    refusal: str | None     # the filter's answer when the prompt is blocked: the model is not run
    opened: bool            # the prompt ends inside a think block (the reply starts with reasoning)
    content_filter: object

    def output(self):
        return Output(ThinkSplitter(opened=self.opened), self.content_filter)


def chat_prompt(server, messages, style=None, think=None, variables=None):
    """The rendered prompt of a chat request. A style's preset goes before the request's own system text. Only the
    last user message is checked by the filter: a conversation whose earlier turn was refused can go on.
    variables: more template variables (the tools)."""
    tok, flt = server.model.tokenizer, server.content_filter
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    try:
        system = system_prompt(style, system)
    except TinyhunError as e:
        raise ApiError(400, f"style: {e}", param="style") from None
    rest = [m for m in messages if m["role"] != "system"]
    if not rest:
        raise ApiError(400, "messages: no user message (only system messages)", param="messages")
    if flt is not None:
        last_user = next((m["content"] for m in reversed(rest) if m["role"] == "user"), "")
        if flt.blocks(last_user):
            return ChatPrompt("", REFUSAL, False, flt)
    rest, think_vars = think_prompt_args(tok, rest, think)
    text = tok.render_chat(([{"role": "system", "content": system}] if system else []) + rest,
                           add_generation_prompt=True, **(variables or {}), **think_vars)
    return ChatPrompt(text, None, text.rstrip().endswith(THINK_OPEN), flt)


def plain(server):
    return Output()
