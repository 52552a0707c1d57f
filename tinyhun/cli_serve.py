"""`tinyhun serve` on the command line: the handler that loads the model and starts the HTTP server (the server's
options and settings: server/options.py)."""
import os
import sys
from pathlib import Path

from . import cli_kv
from .cli_args import backend_of, content_filter_of
from .cli_kv import kv_args
from .server import options


def cmd_serve(args):
    import tinyhun
    from .hub import resolve_model
    from .kernels.kv import BLOCK
    from .server import serve
    settings, adapter = options.settings_of(args, content_filter_of(args))

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
    options.add_arguments(s)
    s.set_defaults(func=cmd_serve)
