"""`tinyhun chat`: the REPL driven through a pseudo-terminal (styles, /system, /think, /reset, a refused prompt,
Ctrl-C mid-reply, Ctrl-D), the Conversation under it (KV cache reuse across turns, a reply stopped early, the
filter on the streamed output) and the one-line errors of its options."""
import io
import os
import re
import signal
import subprocess
import sys
import time

import pexpect
import pytest

import tinyhun
from oracle import ROOT
from tinyhun.chat import CONTENT, REASONING, REFUSED, Conversation, ReplyPieces, Terminal, TurnStats, run_turn
from tinyhun.content_filter import REFUSAL, ContentFilter
from tinyhun.kernels.kv import BLOCK
from tinyhun.styles import STYLES, system_prompt
from tinyhun.thinking import think_prompt_args
from tinyhun.tokenizer import Tokenizer

TINY = ROOT / "weights" / "tiny-hunyuan"
STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s, (\w+); prompt (\d+) tokens, (\d+) reused")


def spawn(*args, preexec_fn=None):
    # TERM=dumb: prompt_toolkit draws a plain prompt; NO_COLOR: no escape codes in what the test reads
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "tinyhun.cli", "chat", "--model", str(TINY), "--quiet", *args],
                          env=env, encoding="utf-8", timeout=300, dimensions=(50, 400), preexec_fn=preexec_fn)
    child.expect("Ctrl-D to leave")
    child.expect("you>")
    return child


def turn(child, text):
    """Send a message; (completion tokens, finish reason, prompt tokens, reused prompt tokens) of the reply."""
    child.sendline(text)
    child.expect(STATS)
    n, finish, prompt, reused = child.match.groups()
    child.expect("you>")
    return int(n), finish, int(prompt), int(reused)


def command(child, line, reply):
    child.sendline(line)
    child.expect(re.escape(reply))
    child.expect("you>")


def leave(child):
    # a Ctrl-D that arrives before prompt_toolkit has put the terminal in raw mode is read as an empty line by the
    # terminal itself and never reaches it: press it again until the chat has gone (at most 10 times)
    for _ in range(10):
        child.sendcontrol("d")
        if child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=3) == 0:
            break
    else:
        raise AssertionError("Ctrl-D did not end the chat")
    child.close()
    assert child.exitstatus == 0


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TINY)


def prompt_tokens(tok, system, user, think=None):
    head = [{"role": "system", "content": system}] if system else []
    messages, kwargs = think_prompt_args(tok, head + [{"role": "user", "content": user}], think)
    return len(tok.encode(tok.render_chat(messages, **kwargs), add_special_tokens=False))


@pytest.mark.slow
def test_repl_styles_system_think_reset_and_refusal(tok):
    c = spawn("--max-tokens", "6", "--temperature", "0", "--style", "formal")
    n, finish, p1, r1 = turn(c, "Hello")
    assert (n, finish, p1, r1) == (6, "length", prompt_tokens(tok, STYLES["formal"], "Hello"), 0)
    _, _, p2, r2 = turn(c, "Tell me more")
    assert r2 >= p1 and p2 > p1                    # the first turn came out of the conversation's cache
    command(c, "/style casual", "(style: casual)")
    _, _, p3, r3 = turn(c, "ok")
    assert r3 < p1                                 # a new system prompt: only the shared start is reused
    command(c, "/think off", "(thinking: off)")
    command(c, "/reset", "(new conversation)")
    # a new conversation: what it reuses is only whole blocks an earlier turn left in the model's KV pool (the
    # same system prompt's), never the reset conversation's own cache
    _, _, p4, r4 = turn(c, "Hello")
    assert p4 == prompt_tokens(tok, STYLES["casual"], "Hello", think=False) and r4 % BLOCK == 0 and r4 < p4
    command(c, "/system You sell bikes.", "(system prompt set)")
    command(c, "/think on", "(thinking: on)")
    command(c, "/reset", "(new conversation)")
    _, _, p5, r5 = turn(c, "Hello")
    assert p5 == prompt_tokens(tok, system_prompt("casual", "You sell bikes."), "Hello", think=True)
    assert r5 % BLOCK == 0 and r5 < p5
    c.sendline("you are a 傻逼")                   # refused without running the model: no stats line
    c.expect(re.escape(REFUSAL))
    c.expect("you>")
    assert not STATS.search(c.before)
    command(c, "/style rude", "unknown style 'rude': expected one of casual, formal, friendly")
    command(c, "/help", "/think on|off")
    leave(c)


@pytest.mark.slow
def test_repl_ctrl_c_stops_the_reply_not_the_chat():
    """Started with SIGINT ignored, as `nohup` or a shell's `&` leave it (a child inherits that): Ctrl-C in the
    chat still works, since the chat takes SIGINT back."""
    c = spawn("--max-tokens", "3000", "--temperature", "0",
              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    c.sendintr()                                   # at the prompt: the line is cleared, the chat goes on
    c.expect("you>")
    c.sendline("Hello")
    c.expect(r"Hello\r*\n")
    c.expect(r"[^\s]{3}")                          # the reply is streaming
    start = time.perf_counter()
    c.sendintr()
    c.expect(r"\[stopped\]", timeout=30)
    assert time.perf_counter() - start < 10
    c.expect("you>")
    assert not STATS.search(c.before)              # it did not run on to max_tokens
    command(c, "/style friendly", "(style: friendly)")
    leave(c)


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY)


def pieces(conv, text):
    out = list(conv.reply(text))
    return out[:-1], out[-1][1]


def test_conversation_reuses_its_cache_turn_after_turn(model):
    conv = Conversation(model, temperature=0, max_tokens=8)
    _, first = pieces(conv, "Hello")
    assert first.cached_tokens == 0 and len(conv.messages) == 2
    _, second = pieces(conv, "And then?")
    assert second.cached_tokens >= first.prompt_tokens
    assert conv.cached_tokens == second.cached_tokens and conv.prompt_tokens == first.prompt_tokens + \
        second.prompt_tokens
    conv.reset()
    assert conv.messages == [] and len(conv.cache) == 0
    again = pieces(conv, "Hello")[1]
    assert (again.prompt_tokens, again.cached_tokens, again.completion_tokens) == (first.prompt_tokens, 0, 8)


def test_a_reply_stopped_early_stays_in_the_conversation(model):
    conv = Conversation(model, temperature=0, max_tokens=40)
    reply = conv.reply("Hello")
    got = [next(reply) for _ in range(3)]
    reply.close()                                  # what Ctrl-C does
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[1]["content"].startswith("".join(t for _, t in got))
    held = len(conv.cache)
    _, stats = pieces(conv, "Go on")
    assert stats.cached_tokens >= held - 3         # the stopped turn's tokens were reused, bar a re-tokenised tail


def test_the_filter_masks_the_streamed_reply_and_refuses_blocked_prompts(model):
    plain, _ = pieces(Conversation(model, temperature=0, max_tokens=16), "Hello")
    text = "".join(t for k, t in plain if k == CONTENT)
    term = next(text[i:i + 2] for i in range(len(text) - 1) if text[i:i + 2].isalpha())
    conv = Conversation(model, temperature=0, max_tokens=16, content_filter=ContentFilter([f"*{term}*"]))
    masked, stats = pieces(conv, "Hello")
    shown = "".join(t for k, t in masked if k == CONTENT)
    assert term not in shown and len(shown) == len(text) and "**" in shown
    assert conv.messages[1]["content"] == text      # the model's own words stay in its context
    blocked = Conversation(model, content_filter=ContentFilter.load())
    assert list(blocked.reply("你这个傻逼")) == [(REFUSED, REFUSAL)]
    assert blocked.messages == [] and len(blocked.cache) == 0


class FakeConversation:
    """A reply with reasoning, to check how the terminal shows it (the tiny model never opens a think block)."""
    cached_tokens, prompt_tokens = 5, 10

    def reply(self, text):
        yield REASONING, "weighing\x1b[2J it"
        yield CONTENT, "Answer\x07."
        yield "stats", TurnStats(10, 5, 2, 0.5, "stop")


def test_thinking_is_dimmed_or_hidden_and_control_characters_dropped():
    out = io.StringIO()
    term = Terminal(out)
    term.color = True
    run_turn(FakeConversation(), "q", term)   # ESC and BEL go; what followed them is plain text
    assert out.getvalue().startswith("\x1b[2mweighing[2J it\x1b[0m\nAnswer.\n\x1b[2m[2 tokens, 4.0 tok/s, stop; "
                                     "prompt 10 tokens, 5 reused, 5 computed; conversation prefill saved 50%]")
    hidden = io.StringIO()
    run_turn(FakeConversation(), "q", Terminal(hidden, hide_thinking=True))
    assert hidden.getvalue().startswith("(thinking...)\nAnswer.\n[2 tokens")


def run(*args):
    return subprocess.run([sys.executable, "-m", "tinyhun.cli", "chat", *args], capture_output=True, text=True,
                          timeout=300)


def test_list_styles_needs_no_model():
    r = run("--list-styles", "--model", "/nonexistent")
    assert r.returncode == 0 and [line.split("\t")[0] for line in r.stdout.splitlines()] == list(STYLES)


@pytest.mark.parametrize("args, message", [
    (["--temperature", "2"], "temperature 2.0: expected 0 (greedy) or a number from 0.1 to 1.0"),
    (["--style", "rude"], "unknown style 'rude'"),
    (["--max-tokens", "0"], "--max-tokens 0: expected an integer >= 1"),
    (["--replace-blocklist"], "--replace-blocklist needs --blocklist FILE"),
    (["--blocklist", "/nonexistent/words.txt"], "/nonexistent/words.txt: blocklist file not found"),
])
def test_bad_options_are_one_line_errors(args, message):
    r = run("--model", str(TINY), *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr.strip().splitlines()[-1]


def test_reply_pieces_split_mask_and_keep_reading_order():
    shown = ReplyPieces(ContentFilter(["傻逼", "kill"]))
    raw = "<think>\nthe user said 傻逼, do not kill\n</think>\n<answer>\nPlease stay calm, kill nothing.\n</answer>"
    pieces = [p for i in range(len(raw)) for p in shown.push(raw[i])] + shown.flush()
    kinds = [k for k, _ in pieces]
    assert kinds == sorted(kinds, key=[REASONING, CONTENT].index)     # all the reasoning before the answer
    assert "".join(t for k, t in pieces if k == REASONING) == "the user said **, do not ****"
    assert "".join(t for k, t in pieces if k == CONTENT) == "Please stay calm, **** nothing."
    plain = ReplyPieces()
    assert plain.push("<think>a</think>b") == [(REASONING, "a"), (CONTENT, "b")] and plain.flush() == []
