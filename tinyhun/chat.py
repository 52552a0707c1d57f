"""`tinyhun chat`: a streaming, multi-turn chat in the terminal.

A Conversation holds the turns, the settings (style, system prompt, thinking, temperature) and one KV cache for
the whole conversation: each turn's prompt is the conversation so far, so generation recomputes only the new
user message (Step.cached_tokens says how much was reused). The reply streams through the think/answer splitter
and the content filter; a blocked prompt is refused without running the model. The REPL around it reads lines
with prompt_toolkit (history, line editing), shows thinking dimmed (or hides it), stops a reply on Ctrl-C and
exits on Ctrl-D.
"""
import os
import sys
import time
from dataclasses import dataclass

from . import tool_calls
from .errors import TinyhunError
from .generation import stream_generate
from .sampling import SamplingParams
from .styles import DEFAULT_TEMPERATURE, STYLES, check_temperature, style_prompt, system_prompt
from .thinking import ThinkSplitter, think_prompt_args, thinking_switch

REASONING, CONTENT, REFUSED = "reasoning", "content", "refused"
# Control characters in model text would drive the terminal (cursor moves, colours, clearing): dropped on the
# way out, all but tab and newline.
CONTROLS = dict.fromkeys([c for c in range(32) if c not in (9, 10)] + list(range(0x7f, 0xa0)))


@dataclass
class TurnStats:
    prompt_tokens: int
    cached_tokens: int       # prompt tokens whose keys/values the conversation's cache already held
    completion_tokens: int
    seconds: float
    finish_reason: str       # "stop", "length" or "interrupted"


class Conversation:
    def __init__(self, model, style=None, system=None, think=None, temperature=DEFAULT_TEMPERATURE,
                 max_tokens=512, content_filter=None, seed=None, tools=None):
        if model.tokenizer is None or not model.tokenizer.has_chat_template:
            raise TinyhunError(f"{getattr(model.tokenizer, 'name', 'this model')}: chat needs a tokenizer with a "
                               "chat template")
        if style is not None:
            style_prompt(style)
        self.model, self.style, self.system, self.think = model, style, system, think
        self.temperature = check_temperature(temperature)
        self.max_tokens, self.filter, self.seed = max_tokens, content_filter, seed
        self.messages: list[dict] = []   # user and assistant turns, as the model saw and wrote them
        self.cache = model.new_cache()
        self.prompt_tokens = self.cached_tokens = 0   # over the whole conversation: the prefill the cache saved
        # tools (OpenAI's list) to try by hand: a reply's calls wait in `calls` for their results (add_result)
        self.tools = tool_calls.check_tools(tools) if tools else None
        self.fmt = tool_calls.format_for(model.tokenizer, "moe" in getattr(model.config, "model_type", ""))
        self.calls = []

    def sampling(self):
        """The next reply's SamplingParams: the conversation's temperature and seed."""
        return SamplingParams(temperature=self.temperature, seed=self.seed)

    def reset(self):
        self.messages.clear()
        self.cache.reset()
        self.prompt_tokens = self.cached_tokens = 0

    def set_style(self, name):
        if name in (None, "", "none"):
            self.style = None
        else:
            style_prompt(name)   # an unknown name is refused, naming the known ones
            self.style = name

    def _prompt(self, user_text):
        """(prompt messages, template variables, the new messages); user_text None: the turn after tool results."""
        system = system_prompt(self.style, self.system)
        head = [{"role": "system", "content": system}] if system else []
        new = [] if user_text is None else [{"role": "user", "content": user_text}]
        new, kwargs = think_prompt_args(self.model.tokenizer, new, self.think)
        prompt = head + self.messages + new
        if self.tools:
            prompt, variables = tool_calls.prompt_messages(self.model.tokenizer, self.fmt, prompt, self.tools)
            kwargs = {**variables, **kwargs}
        return prompt, kwargs, new

    def add_result(self, call_id, text):
        """The result of a call the last reply made, for the next turn (reply(None))."""
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})

    def reply(self, user_text):
        """Yield (kind, text) pieces of the reply: REASONING and CONTENT deltas (masked by the filter), or one
        REFUSED piece for a blocked prompt; then a final ("stats", TurnStats). Closing the generator early
        (Ctrl-C) keeps the part of the reply already generated in the conversation."""
        if self.filter is not None and self.filter.blocks(user_text):
            from .content_filter import REFUSAL
            yield REFUSED, REFUSAL
            return
        prompt, kwargs, new = self._prompt(user_text)
        shown = ReplyPieces(self.filter)
        raw, step, finish, start = [], None, "interrupted", time.perf_counter()
        self.calls = []
        try:
            for step in stream_generate(self.model, prompt, max_tokens=self.max_tokens,
                                        sampling=self.sampling(), cache=self.cache,
                                        chat_template_kwargs=kwargs):
                raw.append(step.text)
                yield from shown.push(step.text)
                if step.finish_reason:
                    finish = step.finish_reason
            yield from shown.flush()
        finally:
            if step is not None:
                # the turn as the model saw and wrote it, so that the next prompt starts with what the cache holds
                self.messages += new + [{"role": "assistant", "content": "".join(raw)}]
                self.prompt_tokens += step.prompt_tokens
                self.cached_tokens += step.cached_tokens
        if self.tools:
            self.calls = tool_calls.parse_all(self.fmt, self.tools, shown.content)[1]
        yield "stats", TurnStats(step.prompt_tokens, step.cached_tokens, step.completion_tokens,
                                 time.perf_counter() - start, finish)


class ReplyPieces:
    """Raw reply text -> the (kind, text) pieces to show: split into REASONING and CONTENT, each masked by the
    content filter (when there is one) as it streams. The reasoning's held-back tail is released as soon as the
    answer starts, so the pieces come in reading order."""

    def __init__(self, content_filter=None):
        self._splitter = ThinkSplitter()
        self._masks = {k: content_filter.stream() for k in (REASONING, CONTENT)} if content_filter else None
        self._reasoning_done = False
        self.content = ""   # the answer so far, as shown (tool calls are read from it)

    def push(self, text):
        return self._pieces(*self._splitter.push(text), final=False)

    def flush(self):
        return self._pieces(*self._splitter.flush(), final=True)

    def _pieces(self, reasoning, content, final):
        out = []
        for kind, text in ((REASONING, reasoning), (CONTENT, content)):
            if self._masks is not None:
                end = final or (kind == REASONING and content and not self._reasoning_done)
                text = self._masks[kind].push(text) + (self._masks[kind].flush() if end else "")
                self._reasoning_done = self._reasoning_done or (kind == REASONING and bool(end))
            if text:
                out.append((kind, text))
                self.content += text if kind == CONTENT else ""
        return out


HELP = """\
/reset           start a new conversation (forget the turns so far)
/system TEXT     set the system prompt (/system alone clears it)
/style NAME      set the reply style: {styles} (/style none clears it)
/think on|off    switch thinking on or off (/think default: the model's own default)
/help            this help
Ctrl-C stops a reply, Ctrl-D (or /exit) leaves."""


class Terminal:
    """Where the chat writes: stdout, with dim text and colours only on a terminal (and without NO_COLOR)."""

    def __init__(self, out=sys.stdout, hide_thinking=False):
        self.out, self.hide_thinking = out, hide_thinking
        self.color = out.isatty() and not os.environ.get("NO_COLOR")

    def write(self, text, dim=False):
        if dim and self.color:
            text = f"\x1b[2m{text}\x1b[0m"
        self.out.write(text)
        self.out.flush()

    def line(self, text, dim=False):
        self.write(text + "\n", dim)

    def model_text(self, text, dim=False):
        self.write(text.translate(CONTROLS), dim)


def run_turn(conv, text, term):
    """Stream one reply to the terminal; Ctrl-C stops it (the chat goes on)."""
    reply = conv.reply(text)
    last, hidden = None, False
    try:
        for kind, piece in reply:
            if kind == "stats":
                if last is not None:
                    term.write("\n")
                term.line(format_stats(piece, conv), dim=True)
                return piece
            if kind == REASONING and term.hide_thinking:
                if not hidden:
                    term.write("(thinking...)", dim=True)
                    hidden, last = True, REASONING
                continue
            if kind == CONTENT and last == REASONING:
                term.write("\n")
            term.model_text(piece, dim=kind == REASONING)
            last = kind
            if kind == REFUSED:
                term.write("\n")
    except KeyboardInterrupt:
        reply.close()
        term.line(" [stopped]", dim=True)
    return None


def format_stats(s, conv):
    new = s.prompt_tokens - s.cached_tokens
    saved = conv.cached_tokens / conv.prompt_tokens if conv.prompt_tokens else 0.0
    rate = s.completion_tokens / s.seconds if s.seconds > 0 else 0.0
    return (f"[{s.completion_tokens} tokens, {rate:.1f} tok/s, {s.finish_reason}; prompt {s.prompt_tokens} tokens, "
            f"{s.cached_tokens} reused, {new} computed; conversation prefill saved {saved:.0%}]")


def command(conv, line, term):
    """Run a /command; False when the chat should end."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("exit", "quit"):
        return False
    if name == "reset":
        conv.reset()
        term.line("(new conversation)", dim=True)
    elif name == "system":
        conv.system = arg or None
        term.line(f"(system prompt {'set' if arg else 'cleared'})", dim=True)
    elif name == "style":
        conv.set_style(arg)
        term.line(f"(style: {conv.style or 'none'})", dim=True)
    elif name == "think":
        choices = {"on": True, "off": False, "default": None}
        if arg not in choices:
            raise TinyhunError(f"/think {arg}: expected on, off or default")
        conv.think = choices[arg]
        note = "" if arg == "default" or thinking_switch(conv.model.tokenizer) else "; this model has no switch for it"
        term.line(f"(thinking: {arg}{note})", dim=True)
    elif name == "help":
        term.line(HELP.format(styles=", ".join(STYLES)))
    else:
        raise TinyhunError(f"unknown command /{name}; /help lists them")
    return True


def ask_results(conv, term, session):
    """Show each call of the last reply and read its result from the user (the tools are tried by hand)."""
    for call_id, name, arguments in conv.calls:
        term.line(f"(tool call {name}({arguments}))", dim=True)
        prompt = f"result of {name}> "
        try:
            result = session.prompt(prompt) if session is not None else input(prompt)
        except EOFError:
            result = ""
        conv.add_result(call_id, result)
    conv.calls = []


def read_lines(session):
    """The user's lines: from prompt_toolkit on a terminal, else one per line of stdin."""
    while True:
        try:
            yield session.prompt("you> ") if session is not None else input()
        except KeyboardInterrupt:   # Ctrl-C at the prompt clears the line, as in a shell
            continue
        except EOFError:
            return


def make_session():
    """A prompt_toolkit session with history in $TINYHUN_HOME/chat_history, or None when stdin is not a
    terminal (lines are then read plainly)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from .hub import home
    try:
        home().mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(home() / "chat_history"))
    except OSError:
        history = InMemoryHistory()
    return PromptSession(history=history)


def repl(conv, term, session):
    term.line("tinyhun chat: /help for commands, Ctrl-D to leave.", dim=True)
    for line in read_lines(session):
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not command(conv, line, term):
                    break
                continue
            run_turn(conv, line, term)
            while conv.calls:
                ask_results(conv, term, session)
                run_turn(conv, None, term)
        except TinyhunError as e:
            term.line(f"tinyhun: {e}")
    term.write("\n")
