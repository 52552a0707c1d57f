"""Thinking models: switching thinking on or off in the prompt, and splitting a reply into its reasoning and its
answer as the text streams.

How thinking is switched is the model's: its chat template's `enable_thinking` variable, else the prefixes its
family's vocabulary was trained on (a family's THINK_SWITCH, found by its VOCAB_MARKERS: tinyhun/families).

Hunyuan-0.5B/1.8B/4B-Instruct answer `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` by default. The
reasoning is the inside of the think block; the content is the rest with the `<answer>` wrapper removed. A reply
that does not open with a think (or answer) block is all content, passed through unchanged.
"""
from .errors import TinyhunError
from .families import vocabulary_family
from .tokenizer import held_back

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Splitter states. START and the two AFTER states wait for the first non-blank text to see whether it opens a
# block; THINK and ANSWER run to their closing tag; CONTENT passes everything through.
START, THINK, AFTER_THINK, ANSWER, AFTER_ANSWER, CONTENT = range(6)
OPENERS = {START: ((THINK_OPEN, THINK), (ANSWER_OPEN, ANSWER)), AFTER_THINK: ((ANSWER_OPEN, ANSWER),),
           AFTER_ANSWER: ()}
BLOCKS = {THINK: (THINK_CLOSE, AFTER_THINK), ANSWER: (ANSWER_CLOSE, AFTER_ANSWER)}


class ThinkSplitter:
    """push(text) -> (reasoning_delta, content_delta): the text released so far, holding back only what may be
    the start of a tag (and blanks that may turn out to sit before one: reasoning and answer are stripped).
    flush() releases the rest at the end of the reply. The result does not depend on how the text was split.

    opened=True when the prompt itself ends inside a think block (a template that pre-fills `<think>`)."""

    def __init__(self, opened: bool = False):
        self._state = THINK if opened else START
        self._buf = ""
        self._fresh = True     # at the start of a block: leading blanks are dropped

    def push(self, text: str) -> tuple[str, str]:
        self._buf += text
        out = ([], [])          # reasoning pieces, content pieces
        while self._step(out):
            pass
        return "".join(out[0]), "".join(out[1])

    @property
    def held(self) -> int:
        """How many of the last characters pushed are not yet decided (released, or dropped as tags and blanks)."""
        return len(self._buf)

    @property
    def reasoning_done(self) -> bool:
        """No more reasoning can come (the think block is closed, or the reply did not open one)."""
        return self._state not in (START, THINK)

    def flush(self) -> tuple[str, str]:
        reasoning, content = self.push("")
        buf, state = self._buf, self._state
        self._buf, self._state = "", CONTENT
        if state == THINK:
            return reasoning + buf.strip() if self._fresh else reasoning + buf.rstrip(), content
        if state == ANSWER:
            buf = buf.strip() if self._fresh else buf.rstrip()
        elif state in (AFTER_THINK, AFTER_ANSWER):
            buf = buf.lstrip()
        return reasoning, content + buf

    def _step(self, out) -> bool:
        """Consume what the current state can decide; True when the state changed (run again)."""
        state, buf = self._state, self._buf
        if state == CONTENT:
            out[1].append(buf)
            self._buf = ""
            return False
        if state in OPENERS:
            s = buf.lstrip()
            if not s:
                return False
            for tag, nxt in OPENERS[state]:
                if s.startswith(tag):
                    self._enter(nxt, s[len(tag):])
                    return True
            if any(tag.startswith(s) for tag, _ in OPENERS[state]):
                return False
            # no block: from START the text is content as it came; after a block, blanks after the tag go
            self._enter(CONTENT, buf if state == START else s)
            return True
        close, nxt = BLOCKS[state]
        sink = out[0] if state == THINK else out[1]
        if self._fresh:
            buf = self._buf = buf.lstrip()
            if not buf:
                return False
            self._fresh = False
        i = buf.find(close)
        if i >= 0:
            sink.append(buf[:i].rstrip())
            self._enter(nxt, buf[i + len(close):])
            return True
        partial = held_back(buf, [close])
        body = buf[:len(buf) - partial]
        keep = partial + len(body) - len(body.rstrip())
        sink.append(buf[:len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _enter(self, state, buf):
        self._state, self._buf, self._fresh = state, buf, True


def template_switches_thinking(tokenizer) -> bool:
    """Whether the chat template reads `enable_thinking` (its render changes with it)."""
    probe = [{"role": "user", "content": "hi"}]
    try:
        return (tokenizer.render_chat(probe, enable_thinking=True)
                != tokenizer.render_chat(probe, enable_thinking=False))
    except TinyhunError:
        return False


def prefix_switch(tokenizer):
    """The (on, off) user-message prefixes the tokenizer's family switches thinking with, or None."""
    family = vocabulary_family(tokenizer)
    return getattr(family, "THINK_SWITCH", None)


def thinking_switch(tokenizer) -> str | None:
    """How thinking is switched for this tokenizer: "template" (its enable_thinking variable), "prefix"
    (a vocabulary whose family has prefixes, e.g. Hunyuan's /think, /no_think, and whose template lacks the
    variable), or None (no switch known: a model that does not think, e.g. SmolLM2, whose user text must not get
    Hunyuan's prefixes)."""
    if template_switches_thinking(tokenizer):
        return "template"
    if prefix_switch(tokenizer):
        return "prefix"
    return None


def think_prompt_args(tokenizer, messages: list[dict], think: bool | None) -> tuple[list[dict], dict]:
    """(messages, template variables) that turn thinking on (True) or off (False), or leave the model's default
    (None): the template's `enable_thinking` variable when it has one, else the family's prefix (Hunyuan's `/think`
    / `/no_think`) on the last user message (the other messages are left as they are, so a conversation renders the
    same way turn after turn and its KV cache stays reusable); unchanged when the model has no switch."""
    messages = list(messages)
    switch = None if think is None else thinking_switch(tokenizer)
    if switch == "template":
        return messages, {"enable_thinking": bool(think)}
    if switch == "prefix":
        prefixes = prefix_switch(tokenizer)
        prefix = prefixes[0] if think else prefixes[1]
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if m.get("role") == "user":
                text = m.get("content") or ""
                if not text.startswith(prefixes):
                    messages[i] = {**m, "content": prefix + text}
                break
    return messages, {}
