"""`tinyhun serve`'s settings in one place: the server's options on the command line, the environment variables
they default from (MAX_TOKENS, TINYHUN_API_KEY), their checks, and the Settings the app runs with. No HTTP
imports here: the command line reads this module for every command's --help."""
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TinyhunError


@dataclass
class Settings:
    """What the app runs with (settings_of builds it from the command line; a library user may make one)."""
    model_name: str | None = None  # the id clients name (default: the model folder's name)
    max_tokens: int = 512          # MAX_TOKENS: the most a request may ask for
    slots: int = 4
    queue: int = 16
    max_context: int | None = None # per slot; None = the model's
    api_key: str | None = None     # TINYHUN_API_KEY
    max_body: int = 1 << 20        # bytes
    content_filter: object = True  # on the chat endpoint (True: the default list, a ContentFilter, or False)
    adapters: dict = field(default_factory=dict)   # name -> peft adapter folder: a model id of its own over the base
    cors: tuple = ()               # origins allowed to call the API from a browser page of theirs ("*": any)
    ui: bool = True                # the chat page at GET /


def env_int(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if not value.strip().isdigit() or int(value) < 1:
        raise TinyhunError(f"${name}={value!r}: expected a positive integer")
    return int(value)


def adapter_specs(values):
    """serve's --adapter values -> (a bare DIR or None, {NAME: DIR}). NAME=DIR names an adapter served beside the
    base (NAME: letters, digits and ._:- ; a value that is itself an existing folder is a DIR); a bare DIR is
    applied to the one model served, as on the other commands."""
    bare, named = None, {}
    for v in values or ():
        name, sep, folder = v.partition("=")
        if sep and re.fullmatch(r"[\w.:-]+", name) and not Path(v).is_dir():
            if name in named:
                raise TinyhunError(f"--adapter {v}: the name {name!r} is given twice")
            if not Path(folder).is_dir():
                raise TinyhunError(f"--adapter {v}: {folder}: not an adapter folder")
            named[name] = folder
        elif bare is not None:
            raise TinyhunError(f"--adapter {v}: a second bare adapter folder; serve several as --adapter NAME=DIR")
        else:
            bare = v
    if bare is not None and named:
        raise TinyhunError(f"--adapter {bare}: a bare folder (applied to the served model) and NAME=DIR adapters "
                           "(chosen per request over the base) do not mix")
    return bare, named


def add_arguments(s):
    """serve's own options on its subparser `s` (the model, device, KV and adapter options are every command's)."""
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--slots", type=int, default=4, help="sequences generated at once, batched (default 4)")
    s.add_argument("--queue", type=int, default=16, help="requests waiting for a slot before 429 (default 16)")
    s.add_argument("--max-tokens", type=int, help="most tokens a request may generate (default $MAX_TOKENS, 512)")
    s.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (413 above)")
    s.add_argument("--served-model-name", help="the model id clients use (default: the folder's name)")
    s.add_argument("--blocklist", metavar="FILE", help="sensitive-word list extending the default one (chat endpoint)")
    s.add_argument("--replace-blocklist", action="store_true", help="use --blocklist FILE instead of the default")
    s.add_argument("--no-filter", action="store_true", help="no content filter on the chat endpoint")
    s.add_argument("--cors", metavar="ORIGIN", action="append", default=[],
                   help="let pages from ORIGIN (e.g. https://app.example.com; * for any) call the API from a browser "
                        "(repeatable; default: none, same-origin only)")
    s.add_argument("--no-ui", action="store_true", help="no chat page at GET /")


def settings_of(args, content_filter):
    """The parsed options (add_arguments') and the environment -> (Settings, the bare --adapter DIR or None);
    a value out of range is a TinyhunError naming the option. content_filter: the chat endpoint's filter (a
    ContentFilter, or None for none), from the options every command with a chat shares."""
    if not 1 <= args.port <= 65535:
        raise TinyhunError(f"--port {args.port}: expected 1..65535")
    for name in ("slots", "queue", "max_body"):
        if getattr(args, name) < (0 if name == "queue" else 1):
            raise TinyhunError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    max_tokens = args.max_tokens if args.max_tokens is not None else env_int("MAX_TOKENS", 512)
    if max_tokens < 1:
        raise TinyhunError(f"--max-tokens {max_tokens}: expected a positive integer")
    adapter, adapters = adapter_specs(args.adapter)
    if adapters and args.adapter_mode == "merge":
        raise TinyhunError("--adapter-mode merge: adapters chosen per request (--adapter NAME=DIR) run as side paths "
                           "over the one base; merge one with `tinyhun merge` and serve that folder instead")
    settings = Settings(model_name=args.served_model_name, max_tokens=max_tokens, slots=args.slots, queue=args.queue,
                        max_context=args.context, api_key=os.environ.get("TINYHUN_API_KEY") or None,
                        max_body=args.max_body, content_filter=content_filter or False, adapters=adapters,
                        cors=tuple(args.cors), ui=not args.no_ui)
    return settings, adapter
