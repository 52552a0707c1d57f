"""Convert Tencent's `hy.tiktoken` rank file (Hunyuan-7B / A13B vocabulary) into a `tokenizers.Tokenizer`.

tiktoken merges, inside each regex piece, the adjacent pair whose concatenation has the lowest rank, and
returns a whole piece directly when it is itself a token. A byte-level BPE with one merge per multi-byte
token (the pair that tiktoken's own merging would form it from, ordered by rank) and `ignore_merges=True`
does exactly the same, so the rest of the engine only ever deals with one tokenizer type.
"""

import base64
import binascii
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from tinyhun.errors import TinyhunError

# The family's split regex, verbatim from Tencent's tokenization_hy.py (note the single-digit \p{N}).
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Appended after the ranked tokens, in this order, starting at SPECIAL_START_ID = number of unique tokens.
SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>") + tuple(
    f"<|extra_{i}|>" for i in range(205)
)


def _byte_to_char() -> list[str]:
    # GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other bytes are moved to
    # code points 256+ so that every byte is a visible, non-space character inside the BPE vocabulary.
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + shifted))
            shifted += 1
    return table


BYTE_TO_CHAR = _byte_to_char()


def read_ranks(path) -> dict[bytes, int]:
    """Token bytes -> rank. Ranks follow line order and repeated byte strings are skipped (the rank column is
    ignored), as Tencent's `_load_tiktoken_bpe` does."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TinyhunError(f"{path}: cannot read tiktoken rank file ({e.strerror})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            token = base64.b64decode(fields[0], validate=True)
            int(fields[1])
        except (ValueError, binascii.Error):
            raise TinyhunError(f"{path}: line {lineno}: expected '<base64 token> <rank>'") from None
        if token and token not in ranks:
            ranks[token] = len(ranks)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TinyhunError(f"{path}: {len(missing)} single-byte tokens missing (e.g. byte {missing[0]}); "
                           "byte-level BPE needs all 256")
    return ranks


def _merge_parts(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    # Replays tiktoken's merging on the token's own bytes, allowing only lower-ranked merges: if this ends in
    # two parts, that pair is the merge that creates the token; otherwise no merge sequence reaches it.
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    pair_rank = [ranks.get(parts[i] + parts[i + 1], limit) for i in range(len(parts) - 1)]  # [len(parts)-1]
    while len(parts) > 2:
        best = min(pair_rank)
        if best >= limit:
            break
        i = pair_rank.index(best)  # the leftmost of equal ranks, as tiktoken picks
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair_rank[i]
        if i > 0:
            pair_rank[i - 1] = ranks.get(parts[i - 1] + parts[i], limit)
        if i < len(parts) - 1:
            pair_rank[i] = ranks.get(parts[i] + parts[i + 1], limit)
    return parts


def tokenizer_from_tiktoken(path) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` that encodes like Tencent's HYTokenizer (NFC + tiktoken)."""
    ranks = read_ranks(path)
    as_str = {tok: "".join(BYTE_TO_CHAR[b] for b in tok) for tok in ranks}
    vocab = {as_str[tok]: rank for tok, rank in ranks.items()}
    merges = []
    for tok in sorted(ranks, key=ranks.__getitem__):  # merge priority = rank of the merged token
        if len(tok) > 1:
            parts = _merge_parts(ranks, tok)
            if len(parts) == 2:
                merges.append((as_str[parts[0]], as_str[parts[1]]))
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    if tok.token_to_id(SPECIAL_TOKENS[0]) != len(ranks):
        raise TinyhunError(f"{path}: special tokens collide with ranked tokens")
    return tok
