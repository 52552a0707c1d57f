"""What the server puts around the model: the chat prompt (a style's system prompt, thinking on or off, the
content filter on the user's words) and the Output each choice's text goes through (thinking split out as
reasoning_content, blocked terms masked)."""
from dataclasses import dataclass

from .schemas import ApiError

DEFAULT_TEMPERATURE = 0.3   # the customer-service default when a request gives none (OpenAI's is 1.0)


class Output:
    """Text deltas in, (reasoning delta, content delta) out; `filtered` once the filter masked something."""

    def __init__(self):
        self.filtered = False

    def push(self, text):
        return "", text

    def flush(self):
        return "", ""


@dataclass
class ChatPrompt:
    text: str
    refusal: str | None     # the filter's answer when the prompt is blocked: the model is not run

    def output(self):
        return Output()


def chat_prompt(server, messages, style=None, think=None):
    if style is not None or think is not None:
        raise ApiError(400, "style/think: not available in this build", param="style" if style else "think")
    return ChatPrompt(server.model.tokenizer.render_chat(messages, add_generation_prompt=True), None)


def plain(server):
    return Output()
