"""The content filter: a sensitive-word list matched after Unicode NFKC + case folding, English and Chinese.

Matching runs on a normalised copy of the text (NFKC, then casefold: full-width letters, ligatures, compatibility
forms and case all fold away; format characters such as the zero-width space are dropped) with an Aho-Corasick
automaton (pyahocorasick) over every entry at once. The copy is built one character cluster at a time (a
character and the marks that compose with it), each cluster remembering the original characters it came from:
normalisation may change lengths (`ﬁ` -> `fi`, `ß` -> `ss`, `e` + U+0301 -> `é`), and a match is masked by
replacing every original character of every cluster it touches.

List file: one entry a line, UTF-8; blank lines and lines starting with `#` are skipped. An entry of letters and
digits only (e.g. `kill`) matches a whole word; `*` at either end lifts that side's word boundary (`fuck*` also
catches `fucking`). Any other entry (Chinese, phrases with spaces or punctuation) matches anywhere.

A blocked prompt gets REFUSAL without running the model. Streamed output goes through `stream()`, which holds back
only the text a blocked term could still be completing (the last entry-length-minus-one normalised characters,
one more when an entry needs a word boundary after it, and the last cluster, which a combining mark may extend),
so that no blocked term survives however the tokens split it.
"""
import unicodedata
from importlib import resources
from pathlib import Path

import ahocorasick

from .errors import TinyhunError

REFUSAL = ("I'm sorry, but I can't help with that request. 抱歉，我无法回答这个问题。")
MASK = "*"


def _fold(text: str) -> str:
    """NFKC, casefold, and no format characters (zero-width space and joiners, soft hyphen, bidi marks: category
    Cf), which render as nothing and would otherwise hide a term."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    if folded.isascii():
        return folded
    return "".join(c for c in folded if unicodedata.category(c) != "Cf")


def _joins(cluster: str, c: str) -> bool:
    """Whether c belongs to the cluster before it: normalising them together differs from normalising each."""
    if c < "\u0300":   # no character below the combining marks composes with, or reorders around, what precedes it
        return False
    return _fold(cluster + c) != _fold(cluster) + _fold(c)


class _Clusters:
    """Text cut into clusters, with their normalised forms joined into `folded` and, for each folded character,
    the index of the cluster it came from."""

    def __init__(self):
        self.text, self.starts, self.parts = "", [], []   # original text, cluster start offsets, folded clusters
        self.folded, self.owner = "", []

    def extend(self, text):
        for c in text:
            if c >= "\u0300" and self.starts and _joins(self.text[self.starts[-1]:], c):
                part = self.parts.pop()
                del self.owner[len(self.owner) - len(part):]
            else:
                self.starts.append(len(self.text))
            self.text += c
            start = self.starts[-1]
            part = c.lower() if start == len(self.text) - 1 and c.isascii() else _fold(self.text[start:])
            self.parts.append(part)
            self.owner.extend([len(self.starts) - 1] * len(part))
        self.folded = "".join(self.parts)

    def drop(self, n):
        """Forget the first n clusters (released text)."""
        off = self.starts[n] if n < len(self.starts) else len(self.text)
        nf = sum(map(len, self.parts[:n]))
        self.text, self.folded = self.text[off:], self.folded[nf:]
        self.starts = [s - off for s in self.starts[n:]]
        self.parts = self.parts[n:]
        self.owner = [o - n for o in self.owner[nf:]]

    def span(self, a, b):
        """Original-text [start, end) of the clusters that folded characters a..b-1 came from."""
        first, last = self.owner[a], self.owner[b - 1]
        end = self.starts[last + 1] if last + 1 < len(self.starts) else len(self.text)
        return self.starts[first], end


def _is_word(c: str) -> bool:
    """A character of a word with spaces around it: letters and digits, but not of the scripts written without
    spaces between words (CJK ideographs, kana: category Lo), next to which a term still counts as a word. MASK
    counts as one, so that masking a term never turns its neighbour into a whole word that a second pass over
    the masked text would find."""
    return c == MASK or (c.isalnum() and unicodedata.category(c) != "Lo")


def _entries(text):
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def read_list(path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TinyhunError(f"{path}: blocklist file not found") from None
    except UnicodeDecodeError as e:
        raise TinyhunError(f"{path}: blocklist is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise TinyhunError(f"{path}: cannot read the blocklist ({e.strerror})") from None
    return _entries(text)


def default_list() -> list[str]:
    return _entries(resources.files("tinyhun").joinpath("data/blocklist.txt").read_text(encoding="utf-8"))


class ContentFilter:
    def __init__(self, entries):
        self._automaton = ahocorasick.Automaton()
        self.entries: list[str] = []
        longest, boundary = 0, False
        for raw in entries:
            if not isinstance(raw, str):
                raise TinyhunError(f"blocklist entry {raw!r}: expected a string")
            entry = raw.strip()
            if MASK in entry.strip("*"):
                raise TinyhunError(f"blocklist entry {entry!r}: '*' may only stand at either end")
            left, right = not entry.startswith("*"), not entry.endswith("*")
            key = _fold(entry.strip("*").strip())
            if not key:
                continue
            word = all(_is_word(c) for c in key)
            need = (left and word, right and word)   # word boundary needed on the (left, right)
            if key in self._automaton:
                old_entry, old_need, _ = self._automaton.get(key)
                need = (old_need[0] and need[0], old_need[1] and need[1])   # the looser spelling wins
                entry = old_entry
            else:
                self.entries.append(entry)
            self._automaton.add_word(key, (entry, need, len(key)))
            longest, boundary = max(longest, len(key)), boundary or need[1]
        self.longest = longest                 # normalised characters in the longest entry
        self._lookahead = max(0, longest - 1 + boundary)   # folded characters a stream must hold back
        if self.entries:
            self._automaton.make_automaton()

    @classmethod
    def load(cls, path=None, extend=True) -> "ContentFilter":
        """The default list, the default list plus the file at `path` (extend=True) or the file's list alone."""
        entries = default_list() if path is None or extend else []
        if path is None:
            return cls(entries)
        entries += read_list(path)
        try:
            return cls(entries)
        except TinyhunError as e:
            raise TinyhunError(f"{path}: {e}") from None

    def _matches(self, cl: _Clusters, before: str = "", final: bool = True):
        """(a, b, entry) folded spans of entries in cl.folded. `before` is the folded character preceding it (for
        word boundaries); with final=False a match whose right boundary depends on text still to come is left out."""
        if not self.entries or not cl.folded:
            return
        text = cl.folded
        for end, (entry, (left, right), length) in self._automaton.iter(text):
            b = end + 1
            a = b - length
            if left and _is_word(text[a - 1] if a > 0 else before[-1:] or " "):
                continue
            if right:
                if b == len(text) and not final:
                    continue
                if b < len(text) and _is_word(text[b]):
                    continue
            yield a, b, entry

    def find(self, text: str) -> list[str]:
        """The entries found in text, in order of appearance, each once."""
        cl = _Clusters()
        cl.extend(text)
        return list(dict.fromkeys(entry for _, _, entry in sorted(self._matches(cl))))

    def blocks(self, text: str) -> bool:
        return bool(self.find(text))

    def mask(self, text: str) -> str:
        """text with every original character of a blocked term replaced by MASK."""
        cl = _Clusters()
        cl.extend(text)
        return _mask_spans(text, [cl.span(a, b) for a, b, _ in self._matches(cl)])

    def stream(self) -> "FilterStream":
        return FilterStream(self)


def _mask_spans(text, spans):
    """text with the characters of each [start, end) span replaced by MASK (spans may run past its end)."""
    chars = list(text)
    for s, e in spans:
        e = min(e, len(chars))
        chars[s:e] = MASK * max(0, e - s)
    return "".join(chars)


class FilterStream:
    """Masks a text as it streams: push(text) returns what may be released now, flush() the rest at the end.
    "".join(pushes) + flush() == ContentFilter.mask(whole text), whatever the split."""

    def __init__(self, flt: ContentFilter):
        self._filter = flt
        self._cl = _Clusters()
        self._before = ""   # the folded character just before the held text (word boundaries)
        self._carry = 0     # leading characters of the held text that belong to a term already found

    def push(self, text: str) -> str:
        self._cl.extend(text)
        return self._release(final=False)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final):
        cl = self._cl
        spans = [cl.span(a, b) for a, b, _ in self._filter._matches(cl, self._before, final)]
        if self._carry:
            spans.append((0, self._carry))
        n = len(cl.starts)
        if not final:
            # keep the last cluster (a mark may still join it) and every cluster a term may still be completing
            cut = len(cl.folded) - self._filter._lookahead
            if cut <= 0:
                n = 0
            elif cut < len(cl.folded):
                n = min(n - 1, cl.owner[cut])
            else:
                n -= 1
        if n <= 0:
            return ""
        upto = cl.starts[n] if n < len(cl.starts) else len(cl.text)
        out = _mask_spans(cl.text[:upto], spans)
        # a term found whole that runs on into the held text: the rest of it is masked when it is released
        self._carry = max((e - upto for s, e in spans if s < upto < e), default=0)
        self._before = "".join(cl.parts[:n])[-1:] or self._before
        cl.drop(n)
        return out
