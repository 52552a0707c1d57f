"""The `tinyhun` command's readers of what the user typed: text arguments, text and JSON files, the content
filter's options. User errors raise TinyhunError naming the option."""
import json
import os
from pathlib import Path

from .errors import TinyhunError


def text_arg(value, what):
    """A command-line string as text. Bytes of argv that do not decode in the locale's encoding arrive as lone
    surrogates (Python's surrogateescape): they are read again as UTF-8, and refused by name when they are not."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        raw = os.fsencode(value)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TinyhunError(f"{what}: not valid UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start}); "
                           "pass the text in UTF-8") from None


def text_file(path, flag):
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else e
        raise TinyhunError(f"{flag} {path}: cannot read it ({why})") from None


def json_file(path, flag, kind):
    try:
        value = json.loads(text_file(path, flag))
    except json.JSONDecodeError as e:
        raise TinyhunError(f"{flag} {path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, kind):
        raise TinyhunError(f"{flag} {path}: expected a JSON {'object' if kind is dict else 'list'}")
    return value


def content_filter_of(args):
    """--blocklist FILE / --replace-blocklist / --no-filter -> a ContentFilter, or None for no filter."""
    if args.no_filter:
        if args.blocklist:
            raise TinyhunError("--blocklist and --no-filter: choose one")
        return None
    if args.replace_blocklist and not args.blocklist:
        raise TinyhunError("--replace-blocklist needs --blocklist FILE")
    from .content_filter import ContentFilter
    return ContentFilter.load(args.blocklist, extend=not args.replace_blocklist)


def backend_of(args):
    """--device as tinyhun.load's backend: the GPU's, or None for the CPU default (TINYHUN_KERNELS may pick)."""
    return "cuda" if args.device == "cuda" else None
