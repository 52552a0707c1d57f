"""Thinking: the streaming <think>/<answer> splitter against a whole-text reference, and the on/off switch."""
import pytest
from hypothesis import given, settings, strategies as st

from oracle import ROOT
from tinyhun.families.hunyuan_v1_dense import THINK_SWITCH
from tinyhun.thinking import ThinkSplitter, template_switches_thinking, think_prompt_args, thinking_switch
from tinyhun.tokenizer import Tokenizer

TINY = ROOT / "weights" / "tiny-hunyuan"
THINK_PREFIX, NO_THINK_PREFIX = THINK_SWITCH


def reference(text):
    """(reasoning, content) of a whole reply, written from the rules of the output format (a think block, then the
    answer, optionally in an answer block)."""
    def answer(s):   # s starts right after <answer>
        j = s.find("</answer>")
        return s.strip() if j < 0 else s[:j].strip() + s[j + len("</answer>"):].lstrip()
    s = text.lstrip()
    if s.startswith("<think>"):
        body = s[len("<think>"):]
        i = body.find("</think>")
        if i < 0:
            return body.strip(), ""
        rest = body[i + len("</think>"):].lstrip()
        if rest.startswith("<answer>"):
            return body[:i].strip(), answer(rest[len("<answer>"):])
        return body[:i].strip(), rest
    if s.startswith("<answer>"):
        return "", answer(s[len("<answer>"):])
    return "", text


def split_stream(text, cuts, opened=False):
    sp = ThinkSplitter(opened=opened)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    got = [sp.push(p) for p in pieces] + [sp.flush()]
    return "".join(r for r, _ in got), "".join(c for _, c in got)


@pytest.mark.parametrize("text, want", [
    ("<think>\nLet me see.\n</think>\n<answer>\nHello!\n</answer>", ("Let me see.", "Hello!")),
    ("<think>\n\n</think>\n<answer>\nHi\n</answer>", ("", "Hi")),
    ("Just an answer, no tags.", ("", "Just an answer, no tags.")),
    ("  plain with <think> inside", ("", "  plain with <think> inside")),
    ("<think>unfinished reasoning", ("unfinished reasoning", "")),
    ("<think>a</think>b without answer tags", ("a", "b without answer tags")),
    ("<answer>direct</answer>", ("", "direct")),
    ("<thinking is not a tag", ("", "<thinking is not a tag")),
    ("", ("", "")),
])
def test_examples(text, want):
    assert reference(text) == want
    assert split_stream(text, []) == want
    assert split_stream(text, list(range(1, len(text)))) == want   # one character at a time


ALPHABET = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<", "/", ">", "think", "answer",
                            "\n", " ", "a", "好", "😀", "<th", "k>"])


@settings(max_examples=400, deadline=None)
@given(st.lists(ALPHABET, max_size=14).map("".join), st.data())
def test_any_split_gives_the_whole_text_result(text, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=8)))
    cuts = [c for c in cuts if c < len(text)]
    assert split_stream(text, cuts) == reference(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(ALPHABET, max_size=12).map("".join), st.data())
def test_opened_block_is_reasoning_until_it_closes(text, data):
    cuts = sorted(c for c in data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=6)) if c < len(text))
    assert split_stream(text, cuts, opened=True) == reference("<think>" + text)


def test_only_a_possible_tag_is_held_back():
    sp = ThinkSplitter()
    assert sp.push("<th") == ("", "")
    assert sp.push("ink>\nStep one") == ("Step one", "")
    assert sp.push(" then two </thi") == (" then two", "")    # the blank and the partial tag wait
    assert sp.push("nk>\n<answer>Yes") == ("", "Yes")
    assert sp.push(" sir") == ("", " sir")
    assert sp.flush() == ("", "")
    plain = ThinkSplitter()
    assert plain.push("Hello") == ("", "Hello")              # no block opened: content at once


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TINY)


def test_template_with_enable_thinking_gets_the_variable(tok):
    chat = [{"role": "user", "content": "hello"}]
    assert template_switches_thinking(tok) and thinking_switch(tok) == "template"
    msgs, kw = think_prompt_args(tok, chat, False)
    assert msgs == chat and kw == {"enable_thinking": False}
    assert tok.render_chat(msgs, **kw).endswith("<｜hy_Assistant｜><think>\n\n</think>\n")
    assert think_prompt_args(tok, chat, None) == (chat, {})


def test_template_without_the_variable_gets_the_prefix(tmp_path, tok):
    import json
    import shutil
    folder = tmp_path / "tok"
    shutil.copytree(TINY, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    plain = Tokenizer.from_dir(folder)
    assert not template_switches_thinking(plain) and thinking_switch(plain) == "prefix"
    chat = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second"}]
    msgs, kw = think_prompt_args(plain, chat, False)
    assert kw == {} and msgs[0] == chat[0] and msgs[2]["content"] == NO_THINK_PREFIX + "second"
    assert chat[2]["content"] == "second"                     # the caller's list is not changed
    assert think_prompt_args(plain, chat, True)[0][2]["content"] == THINK_PREFIX + "second"
    again, _ = think_prompt_args(plain, msgs, False)          # a prefixed message is not prefixed twice
    assert again == msgs


def test_a_model_without_a_switch_gets_no_hunyuan_prefix(tmp_path):
    """A Llama-style vocabulary without Hunyuan's control tokens: /no_think would only be noise in the prompt."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers
    backend = Backend(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}')
    tok = Tokenizer.from_dir(tmp_path)
    chat = [{"role": "user", "content": "hi"}]
    assert thinking_switch(tok) is None and think_prompt_args(tok, chat, False) == (chat, {})
