"""`tinyhun serve`: its options, its --adapter NAME=DIR specs, and the handler that starts the HTTP server."""
import os
import re
import sys
from pathlib import Path

from . import cli_kv
from .cli_args import backend_of, content_filter_of
from .cli_kv import kv_args
from .errors import TinyhunError


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


def cmd_serve(args):
    import tinyhun
    from .hub import resolve_model
    from .kernels.kv import BLOCK
    from .server import Settings, serve
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
                        max_body=args.max_body, content_filter=content_filter_of(args) or False, adapters=adapters,
                        cors=tuple(args.cors), ui=not args.no_ui)

    # a named model folder is checked now (a typo exits at once); the default model is fetched in the background
    named = resolve_model(args.model) if args.model or os.environ.get("MODEL_PATH") else None
    if args.device == "cuda":   # and so is the GPU
        from .backends.cuda import require_cuda
        require_cuda()

    kv, held = kv_args(args), []

    def load():
        path = named or resolve_model(None, progress=not args.quiet)
        model = tinyhun.load(path, kernels=backend_of(args), progress=not args.quiet, adapter=adapter,
                             adapter_mode=args.adapter_mode if adapter else None, **kv)
        held.append(cli_kv.pin_prompt_cache(model, args))   # its blocks stay while the server runs
        pool = model.kv_pool
        print(f"tinyhun serve: KV memory {pool.blocks * pool.block_bytes / 2**20:.0f} MiB of {pool.kind} "
              f"({pool.blocks * BLOCK} tokens, {pool.token_bytes / 1024:.0f} KiB a token), context "
              f"{model.max_context} tokens; used only as tokens arrive (--kv-memory, --kv-dtype)", file=sys.stderr,
              flush=True)
        return model, Path(path).name
    serve(load, settings, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")


def add_parser(sub, with_model):
    """The serve subcommand on the `tinyhun` parser (with_model: its model, device, KV and adapter options)."""
    s = with_model(sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming)"),
                   adapters=True)
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
    s.set_defaults(func=cmd_serve)
