"""tinyhun.tokenizer against its oracles: tiktoken (for the hy.tiktoken conversion) and transformers'
AutoTokenizer (for the tiny hy_ tokenizer folder written by weights/tiny_tokenizer.py)."""
import base64
import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import tiktoken
import tiktoken._educational
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyhun.errors import TinyhunError
from tinyhun.tiktoken_bpe import BYTE_TO_CHAR, PAT_STR, SPECIAL_TOKENS, tokenizer_from_tiktoken
from tinyhun.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=200, deadline=None)

# --- hypothesis text: ASCII, Chinese, emoji, whitespace runs, decomposed accents, other scripts -------------
ASCII = st.text(st.characters(max_codepoint=127), max_size=12)
CHINESE = st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF) | st.sampled_from("，。！？、：；《》“”"),
                  max_size=8)
EMOJI = st.lists(st.sampled_from(["😀", "🎉", "👍🏽", "👨‍👩‍👧", "❤️", "🇨🇳", "🤖"]) |
                 st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=4).map("".join)
SPACES = st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u3000\u2028\x85"), max_size=6)
ACCENTS = st.lists(st.sampled_from(["e\u0301", "a\u0300", "o\u0308", "n\u0303", "c\u0327", "A\u030a", "\u00e9",
                                    "\u1e69", "s\u0323\u0307"]), max_size=4).map("".join)
# Other scripts, without combining marks: Python's unicodedata (Tencent's NFC) and the tokenizers crate
# ship different Unicode versions, whose canonical ordering of rare marks differs.
OTHER = st.text(st.characters(exclude_categories=("Cs", "Co", "Cn", "Mn", "Me")), max_size=6)
PIECES = [ASCII, CHINESE, EMOJI, SPACES, ACCENTS, OTHER]


def mixed_text(*extra):
    return st.lists(st.one_of(*PIECES, *extra), max_size=8).map("".join)


def slices(text):
    """Substrings of a training text: they contain the learnt merges, so merge order matters on them."""
    return st.tuples(st.integers(0, len(text)), st.integers(1, 40)).map(lambda s: text[s[0]:s[0] + s[1]])


# --- the hy.tiktoken oracle ---------------------------------------------------------------------------------
CORPUS = """\
The quick brown fox jumps over the lazy dog. It's the dog's bowl, isn't it? We'll see; they've gone, I'm sure.
Numbers 12345 and 3.14159 appear 2024 times.\n\n    Indented   text\twith tabs\r\nand CRLF lines.\n
你好，世界！今天天气很好。我们一起去公园散步吧。人工智能、机器学习、深度学习。中文分词测试。
Emoji 😀😀🎉🎉 👍🏽 and café naïve résumé crème brûlée. Ελληνικά русский текст. 日本語のテキスト。
"""
# Appended after the trained ranks: tokens no merge sequence reaches, which tiktoken (and the conversion)
# still produce when a whole regex piece equals them.
UNREACHABLE = ["zzq", " qzx", "龘龘"]


@pytest.fixture(scope="module")
def tiktoken_case(tmp_path_factory):
    """(folder with hy.tiktoken, tiktoken.Encoding built the way Tencent's HYTokenizer builds it)."""
    ranks = tiktoken._educational.bpe_train(CORPUS, 420, PAT_STR, visualise=None)
    for text in UNREACHABLE:
        ranks[text.encode()] = len(ranks)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in ranks.items()]
    lines.insert(350, lines[300].split()[0] + " 7")  # a repeated token: skipped, its rank column ignored
    folder = tmp_path_factory.mktemp("tiktoken")
    (folder / "hy.tiktoken").write_text("\n".join(lines) + "\n")
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("hy-test", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    return folder, enc


@pytest.fixture(scope="module")
def tiktoken_tok(tiktoken_case):
    return Tokenizer.from_dir(tiktoken_case[0])


def test_tiktoken_vocab_layout(tiktoken_case, tiktoken_tok):
    folder, enc = tiktoken_case
    n = len(enc._mergeable_ranks)
    vocab = tokenizer_from_tiktoken(folder / "hy.tiktoken").get_vocab(with_added_tokens=False)
    assert vocab == {"".join(BYTE_TO_CHAR[b] for b in tok): rank for tok, rank in enc._mergeable_ranks.items()}
    assert tiktoken_tok.vocab_size == enc.n_vocab == n + 210
    assert tiktoken_tok.encode("<|endoftext|><|eos|><|extra_204|>") == [n, n + 3, n + 209]
    assert tiktoken_tok.stop_ids == {n, n + 3}  # <|endoftext|>, <|eos|>
    assert tiktoken_tok.bos_id is None


@FAST
@given(mixed_text(slices(CORPUS), st.sampled_from(UNREACHABLE + ["<|endoftext|>", "<|eos|>", "<|extra_4|>"])))
def test_tiktoken_conversion_matches_tiktoken(tiktoken_case, tiktoken_tok, text):
    _, enc = tiktoken_case
    nfc = unicodedata.normalize("NFC", text)  # HYTokenizer normalises before calling tiktoken
    ids = tiktoken_tok.encode(text)
    assert ids == enc.encode(nfc, allowed_special="all")
    assert tiktoken_tok.decode(ids, skip_special_tokens=False) == nfc
    assert tiktoken_tok.decode(ids) == enc.decode([i for i in ids if i < len(enc._mergeable_ranks)])


def test_tiktoken_nfc_and_unreachable_tokens(tiktoken_case, tiktoken_tok):
    _, enc = tiktoken_case
    assert tiktoken_tok.encode("cafe\u0301 nai\u0308ve") == tiktoken_tok.encode("caf\u00e9 na\u00efve")
    assert tiktoken_tok.encode("zzq") == [enc._mergeable_ranks[b"zzq"]]
    assert len(tiktoken_tok.encode("zzqa")) == 4  # inside a longer piece no merge can build it


# --- the tiny hy_ tokenizer vs transformers -----------------------------------------------------------------
def load_tiny_module():
    spec = importlib.util.spec_from_file_location("tiny_tokenizer", ROOT / "weights" / "tiny_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = load_tiny_module()
HY_SPECIALS = st.sampled_from(tiny.SPECIALS)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    assert tiny.build(folder) <= 512
    return folder


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def test_tiny_build_is_deterministic(tiny_dir, tmp_path):
    assert tiny.build(tmp_path) == Tokenizer.from_dir(tiny_dir).vocab_size
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes()


@FAST
@given(mixed_text(slices(tiny.CORPUS), HY_SPECIALS))
def test_tiny_matches_transformers(tiny_tok, hf_tok, text):
    for add in (True, False):
        ids = tiny_tok.encode(text, add_special_tokens=add)
        assert ids == hf_tok(text, add_special_tokens=add).input_ids
    for skip in (True, False):
        assert tiny_tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tiny_tok.decode(ids, skip_special_tokens=False) == text


def test_tiny_ids(tiny_tok, hf_tok):
    assert tiny_tok.vocab_size == len(hf_tok) <= 512
    assert tiny_tok.bos_id == hf_tok.bos_token_id == tiny_tok.encode("")[0]
    assert tiny_tok.stop_ids == {hf_tok.convert_tokens_to_ids(t) for t in (tiny.END_OF_TURN, tiny.EOS)}


CHATS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "你好 😀"}],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2", "reasoning_content": None}, {"role": "user", "content": "再来"}],
]
RENDER_KWARGS = [{}, {"add_generation_prompt": False}, {"enable_thinking": False}, {"enable_thinking": True}]


@pytest.mark.parametrize("kwargs", RENDER_KWARGS)
@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_matches_transformers(tiny_tok, hf_tok, chat, kwargs):
    kwargs = {"add_generation_prompt": True, **kwargs}
    expected = hf_tok.apply_chat_template(chat, tokenize=False, **kwargs)
    assert tiny_tok.render_chat(chat, **kwargs) == expected
    assert tiny_tok.encode(expected, add_special_tokens=False) == hf_tok.apply_chat_template(
        chat, tokenize=True, return_dict=False, **kwargs)


def test_chat_template_of_spec_example(tiny_tok):
    chat = CHATS[1][:1] + [{"role": "user", "content": "Hello"}]
    assert tiny_tok.render_chat(chat) == ("<｜hy_begin▁of▁sentence｜>You are a helpful assistant."
                                          "<｜hy_place▁holder▁no▁3｜><｜hy_User｜>Hello<｜hy_Assistant｜>")


def copy_without_template(src, dst):
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("kwargs", RENDER_KWARGS)
@pytest.mark.parametrize("chat", CHATS)
def test_hy_fallback_template(tiny_dir, tiny_tok, tmp_path, chat, kwargs):
    fallback = Tokenizer.from_dir(copy_without_template(tiny_dir, tmp_path / "t"))
    assert fallback.render_chat(chat, **kwargs) == tiny_tok.render_chat(chat, **kwargs)


def test_old_tiktoken_fallback_template(tiktoken_tok):
    render = tiktoken_tok.render_chat
    system, user, answer = {"role": "system", "content": "S"}, {"role": "user", "content": "U"}, \
        {"role": "assistant", "content": "A"}
    assert render([system, user]) == "<|startoftext|>S<|extra_4|>U<|extra_0|>"
    assert render([user]) == "<|startoftext|>U<|extra_0|>"
    assert render([system, user, answer, user]) == \
        "<|startoftext|>S<|extra_4|>U<|extra_0|>A<|eos|><|startoftext|>U<|extra_0|>"
    assert render([user], enable_thinking=False) == "<|startoftext|>U<|extra_0|><think>\n\n</think>\n"
    with pytest.raises(TinyhunError, match="unsupported role"):
        render([{"role": "tool", "content": "x"}])


TEMPLATE = """{% for m in messages %}
  {% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}
  {% if loop.index > 2 %}{% break %}{% endif %}
  [{{ m.role }}] {{ m | tojson }} {{ tools | tojson(indent=1) }}
{% endfor %}{{ bos_token }}|{{ pad_token }}|{{ greeting | default('-') }}"""


def test_file_template_features_match_transformers(tiny_dir, tmp_path):
    # trim_blocks/lstrip_blocks, loopcontrols, tojson without HTML escaping, extra variables, raise_exception,
    # and chat_template.jinja taking priority over tokenizer_config.json
    transformers = pytest.importorskip("transformers")
    folder = shutil.copytree(tiny_dir, tmp_path / "t")
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    ours, hf = Tokenizer.from_dir(folder), transformers.AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "<b>&'\"你好"}, {"role": "assistant", "content": "x", "tool_calls": None},
            {"role": "user", "content": "y"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    for kwargs in ({}, {"greeting": "hi", "tools": tools}):
        assert ours.render_chat(chat, **kwargs) == hf.apply_chat_template(chat, tokenize=False, **kwargs)
    with pytest.raises(TinyhunError, match="bad role"):
        ours.render_chat([{"role": "bad", "content": ""}])


def test_no_template_no_fallback(tmp_path):
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template and tok.stop_ids == frozenset()
    assert tok.decode(tok.encode("plain text")) == "plain text"
    with pytest.raises(TinyhunError, match="has no chat template; use --raw"):
        tok.render_chat([{"role": "user", "content": "hi"}])


def test_stop_ids_union(tiny_dir, tiny_tok, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "t")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 453], "do_sample": True}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 11, "eod_token_id": 12, "bos_token_id": 1}))
    tok = Tokenizer.from_dir(folder)
    assert tok.stop_ids == tiny_tok.stop_ids | {7, 11, 12, 453}
    assert tok.bos_id == tiny_tok.bos_id  # tokenizer_config's bos_token wins over config.json


def test_special_tokens_from_tokenizer_config(tiktoken_case, tiktoken_tok, tmp_path):
    folder = shutil.copytree(tiktoken_case[0], tmp_path / "t")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|extra_5|>"},
                                                              "bos_token": "<|bos|>"}))
    tok = Tokenizer.from_dir(folder)
    n = len(tiktoken_case[1]._mergeable_ranks)
    assert tok.stop_ids == tiktoken_tok.stop_ids | {n + 10} and tok.bos_id == n + 2


# --- streaming ----------------------------------------------------------------------------------------------
STREAM_TEXT = mixed_text(st.sampled_from(["你好世界", "😀🎉", "👨‍👩‍👧", "天气很好。", "é"]))


def check_stream(tok, ids):
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    text = tok.decode(ids)
    assert "".join(pieces) == text
    for piece in pieces:
        piece.encode("utf-8", "strict")
        assert "\ufffd" not in piece or "\ufffd" in text  # no half character, unless the text has U+FFFD
    return pieces


@FAST
@given(STREAM_TEXT)
def test_stream_decoder(tiny_tok, tiktoken_tok, text):
    for tok in (tiny_tok, tiktoken_tok):
        check_stream(tok, tok.encode(text))


def test_stream_holds_back_split_characters(tiny_tok):
    ids = tiny_tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    assert check_stream(tiny_tok, ids) == [""] * (len(ids) - 1) + ["😀", ""]
    stream = tiny_tok.stream()
    assert stream.push(ids[0]) == "" and stream.flush() == tiny_tok.decode(ids[:1])  # flush gives what decode does


def test_stream_keeps_context_for_metaspace_decoders(tmp_path):
    # sentencepiece-style decoders drop the leading space of the first token decoded: pieces decoded on their
    # own would glue the words together
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers
    backend = Backend(models.WordLevel({"▁a": 0, "▁b": 1, "<unk>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert check_stream(tok, tok.encode("a b b a")) == ["a", " b", " b", " a", ""]


# --- bad input ----------------------------------------------------------------------------------------------
def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TinyhunError, match="no tokenizer.json or hy.tiktoken"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TinyhunError, match="not a folder"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3')
    with pytest.raises(TinyhunError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("line, message", [("!!!notbase64 5", "line 3"), ("YWJj", "line 3"), ("YWJj x", "line 3")])
def test_malformed_tiktoken_line(tmp_path, line, message):
    lines = [base64.b64encode(bytes([b])).decode() + f" {b}" for b in range(256)]
    lines.insert(2, line)
    (tmp_path / "hy.tiktoken").write_text("\n".join(lines))
    with pytest.raises(TinyhunError, match=f"hy.tiktoken: {message}"):
        Tokenizer.from_dir(tmp_path)


def test_tiktoken_missing_bytes(tmp_path):
    (tmp_path / "hy.tiktoken").write_text("YWJj 0\n")
    with pytest.raises(TinyhunError, match="hy.tiktoken: 256 single-byte tokens missing"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer_config.json", "{bad json", "tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", '{"chat_template": "{% if %}"}', "tokenizer_config.json: chat template does not parse"),
    ("tokenizer_config.json", '{"eos_token": 5}', "tokenizer_config.json: eos_token must be"),
    ("generation_config.json", '{"eos_token_id": "x"}', "generation_config.json: eos_token_id must be"),
    ("config.json", "[1, 2]", "config.json: expected a JSON object"),
])
def test_bad_config_files(tiny_dir, tmp_path, name, content, message):
    folder = shutil.copytree(tiny_dir, tmp_path / "t")
    (folder / name).write_text(content)
    with pytest.raises(TinyhunError, match=message):
        Tokenizer.from_dir(folder)
