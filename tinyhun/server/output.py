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
    """Text deltas in, (reasoning delta, content delta) out. It counts what it holds (tokens.py aligns each token's
    logprob with its text by them): `fed` characters in, of which the splitter has decided all but `held`; the
    splitter has `produced` so many (reasoning, content) characters, of which the masks have `released` so many."""

    def __init__(self, splitter=None, content_filter=None):
        self.splitter = splitter
        self.masks = None if content_filter is None else (content_filter.stream(), content_filter.stream())
        self.fed, self.produced, self.released = 0, (0, 0), (0, 0)
        self._reasoning_open = splitter is not None and self.masks is not None

    def step(self, step):
        """push() of a generation Step's text."""
        return self.push(step.text)

    def push(self, text):
        self.fed += len(text)
        parts = self.splitter.push(text) if self.splitter else ("", text)
        self.produced = tuple(n + len(p) for n, p in zip(self.produced, parts))
        if self.masks is not None:
            parts = tuple(m.push(p) for m, p in zip(self.masks, parts))
            if self._reasoning_open and self.splitter.reasoning_done:   # its tail need not wait for the reply's end
                self._reasoning_open = False
                parts = (parts[0] + self.masks[0].flush(), parts[1])
        return self._count(parts)

    def flush(self):
        parts = self.splitter.flush() if self.splitter else ("", "")
        self.produced = tuple(n + len(p) for n, p in zip(self.produced, parts))
        if self.masks is not None:
            parts = tuple(m.push(p) + m.flush() for m, p in zip(self.masks, parts))
        return self._count(parts)

    @property
    def held(self):
        return self.splitter.held if self.splitter else 0

    def _count(self, parts):
        # masking keeps lengths: released text is as long as the produced text it stands for
        self.released = tuple(n + len(p) for n, p in zip(self.released, parts))
        return parts


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
