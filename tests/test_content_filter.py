"""The content filter: NFKC + casefold matching (English and Chinese), masking mapped back to the original
characters, and a stream that lets no blocked term through however the text is split."""
import unicodedata

import pytest
from hypothesis import given, settings, strategies as st

from tinyhun.content_filter import MASK, REFUSAL, ContentFilter, _Clusters, default_list
from tinyhun.errors import TinyhunError

ENTRIES = ["kill", "fuck*", "*bomb*", "傻逼", "piece of shit", "straße", "ﬁre away"]


@pytest.fixture(scope="module")
def flt():
    return ContentFilter(ENTRIES)


@pytest.mark.parametrize("text, found", [
    ("I will KILL it", ["kill"]),
    ("ｋｉｌｌ", ["kill"]),                           # full-width letters
    ("Kill.", ["kill"]),
    ("skill and killer", []),                        # whole words only
    ("fucking hell", ["fuck*"]),                     # a starred end lifts the boundary
    ("motherfucker", []),                            # ... only on that side
    ("a pipebombs shop", ["*bomb*"]),
    ("你个傻逼啊", ["傻逼"]),                         # Chinese matches anywhere
    ("PIECE OF SHIT", ["piece of shit"]),
    ("STRASSE", ["straße"]),                         # ß casefolds to ss
    ("fire away", ["ﬁre away"]),                     # an entry is normalised too
    ("kill傻逼", ["kill", "傻逼"]),                   # CJK next to a word is a boundary
    ("nothing here", []),
    ("fuc\u200bk off", ["fuck*"]),                  # a zero-width space does not hide a term
    ("傻\u00ad逼", ["傻逼"]),                        # nor does a soft hyphen
])
def test_find(flt, text, found):
    assert flt.find(text) == found
    assert flt.blocks(text) == bool(found)


@pytest.mark.parametrize("text, masked", [
    ("I will KILL it", "I will **** it"),
    ("ｋｉｌｌ now", "**** now"),
    ("e\u0301kill", "e\u0301kill"),                  # é (e + combining acute) is a letter: no boundary
    ("STRAẞE!", "******!"),                          # U+1E9E folds to ss: 7 folded, 6 original characters
    ("straße", "******"),
    ("ﬁre away", "********"),                        # the ligature: two folded characters, one mask
    ("你个傻逼啊", "你个**啊"),
    ("Ｋ\u0301ill", "Ｋ\u0301ill"),                   # K + mark is not k
    ("ki\u200bll!", "*****!"),                      # the zero-width space inside is masked with the term
])
def test_mask_maps_normalised_spans_back(flt, text, masked):
    assert flt.mask(text) == masked


def test_cluster_folding_equals_whole_text_folding():
    for text in ["ﬁre", "e\u0301\u0323", "a\u0301\u0323b", "ｋｉｌｌ", "Ⅻ", "ǅ", "\u1100\u1161\u11a8", "Straße"]:
        cl = _Clusters()
        cl.extend(text)
        assert cl.folded == unicodedata.normalize("NFKC", text).casefold(), text
    cl = _Clusters()
    cl.extend("a\u200bb\u00ad")
    assert cl.folded == "ab" and cl.span(0, 2) == (0, 3)


PIECES = st.sampled_from(["kill", "KI", "ll", "ｋ", "ｉ", "l", "fuck", "Fu", "ing", "bomb", "bo", "mb", "傻", "逼",
                          "piece", " of ", "shit", "stra", "ß", "SS", "e", "\u0301", "ﬁ", "re", " away", " ", ".",
                          "s", "x", "*", "\n", "好", "\u200b", "\u00ad"])


def split(text, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=10)))
    cuts = [c for c in cuts if c < len(text)]
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@settings(max_examples=500, deadline=None)
@given(st.lists(PIECES, max_size=16).map("".join), st.data())
def test_stream_equals_whole_text_mask_whatever_the_split(flt, text, data):
    s = flt.stream()
    out = "".join(s.push(p) for p in split(text, data)) + s.flush()
    assert out == flt.mask(text)
    assert len(out) == len(text)
    assert flt.find(out) == []                       # no blocked term survives
    assert all(o == t or o == MASK for o, t in zip(out, text))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([("kill", "****"), ("ＫＩＬＬ", "****"), ("KiLl", "****"), ("fuckers", "****ers"),
                        ("BOMB", "****"), ("傻逼", "**"), ("Piece Of Shit", "*" * 13), ("STRASSE", "*" * 7)]),
       st.sampled_from(["", " ", "a ", "好", ". "]), st.sampled_from(["", " ", " a", "好", "!"]), st.data())
def test_a_planted_term_never_reaches_the_client(flt, planted, before, after, data):
    term, masked = planted          # a starred entry masks the entry, not the rest of the word
    s = flt.stream()
    out = "".join(s.push(p) for p in split(before + term + after, data)) + s.flush()
    assert out == before + masked + after


def test_stream_holds_back_only_what_a_term_may_still_complete():
    flt = ContentFilter(["kill", "傻逼"])   # 4 folded characters: hold 3, and 1 more to see where a word ends
    s = flt.stream()
    assert s.push("hello there ") == "hello th"
    assert s.push("ki") == "er"
    assert s.push("ll") == "e "                      # "kill" may still become "killer"
    assert s.push(" you") == "****"                  # found whole: released masked
    assert s.push("你个傻") == " yo"
    assert s.push("逼") == "u"
    assert s.push("ers") == "你个*"                  # the term's end is carried into the held text
    assert s.flush() == "*ers"
    assert ContentFilter(["傻逼"]).stream().push("你好傻") == "你好"   # no word entries: hold 1 character


def test_default_list_loads_and_blocks_english_and_chinese():
    flt = ContentFilter.load()
    assert flt.entries == [e for e in dict.fromkeys(default_list())]
    assert flt.blocks("You are a ＦＵＣＫＩＮＧ idiot") and flt.blocks("你这个傻逼")
    assert not flt.blocks("How do I reset my password?") and not flt.blocks("请问怎么退货？")
    assert REFUSAL and not flt.blocks(REFUSAL)


def test_blocklist_file_extends_or_replaces(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("# shop-specific\n\ncompetitorco\n退款骗局\n", encoding="utf-8")
    both = ContentFilter.load(f)
    assert both.blocks("try CompetitorCo instead") and both.blocks("傻逼")
    only = ContentFilter.load(f, extend=False)
    assert only.blocks("退款骗局") and not only.blocks("傻逼")


@pytest.mark.parametrize("content, message", [
    (None, "blocklist file not found"),
    (b"\xff\xfe bad", "not UTF-8"),
    ("ok\na*b\n".encode(), "'*' may only stand at either end"),
])
def test_bad_blocklist_is_named(tmp_path, content, message):
    f = tmp_path / "list.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(TinyhunError, match=message) as e:
        ContentFilter.load(f)
    assert str(f) in str(e.value)


def test_empty_filter_passes_everything():
    flt = ContentFilter([])
    s = flt.stream()
    assert s.push("any text") + s.flush() == "any text" and not flt.blocks("kill")


def test_labelled_list_is_classified_as_labelled_where_nfkc_can_see_it():
    """bench/data/filter_labelled.jsonl (bench/bench_filter.py reports the rates): every row is right but the kinds
    that NFKC + casefold cannot see through (separators, leetspeak, homoglyphs) or a word list cannot tell apart
    (a term mentioned, not used)."""
    import json
    from oracle import ROOT
    blind = {"spaced / dotted", "leetspeak", "homoglyph / marks", "mention not use"}
    flt = ContentFilter.load()
    rows = [json.loads(line) for line in (ROOT / "bench/data/filter_labelled.jsonl").read_text("utf-8").splitlines()]
    assert len(rows) > 100 and {r["kind"] for r in rows} >= blind
    wrong = [r for r in rows if r["kind"] not in blind and flt.blocks(r["text"]) != r["blocked"]]
    assert wrong == []
