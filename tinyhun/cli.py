"""The `tinyhun` command: a thin consumer of the library. User errors print one line and exit 2."""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

from . import cli_kv, cli_serve
from .cli_args import backend_of, content_filter_of, json_file, text_arg, text_file
from .cli_kv import kv_args
from .errors import TinyhunError


def load_model(args):
    """--model > $MODEL_PATH > the default model; with --adapter, a peft LoRA adapter on it (--adapter-mode)."""
    import tinyhun
    from .hub import resolve_model
    adapter = getattr(args, "adapter", None)
    return tinyhun.load(resolve_model(args.model, progress=not args.quiet), kernels=backend_of(args),
                        progress=not args.quiet, adapter=adapter,
                        adapter_mode=getattr(args, "adapter_mode", None) if adapter else None, **kv_args(args))


def cmd_generate(args):
    import tinyhun
    from . import moe_stats
    from .sampling import SamplingParams
    prompt = text_arg(args.prompt, "the prompt")
    system = None if args.system is None else text_arg(args.system, "--system")
    stop = [text_arg(s, "--stop") for s in args.stop or ()]
    schema = None if args.json_schema is None else json_file(args.json_schema, "--json-schema", dict)
    grammar = None if args.grammar is None else text_file(args.grammar, "--grammar")
    model = load_model(args)
    pinned = cli_kv.pin_prompt_cache(model, args)   # noqa: F841  (held: its blocks stay shared while we run)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    pieces = tinyhun.generate(model, prompt, max_tokens=args.max_tokens, sampling=sampling, chat=args.chat,
                              stop=stop, system=system, json_schema=schema, grammar=grammar, regex=args.regex)
    with (moe_stats.collect(model) if args.moe_stats else contextlib.nullcontext()) as stats:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if stats is not None:
        print(moe_stats.format_report(stats.report()), file=sys.stderr)


def cmd_info(args):
    from .families import family_of, load_config
    from .hub import resolve_model
    from .weights import load_weights
    path = resolve_model(args.model)
    cfg = load_config(Path(path) / "config.json")
    w = load_weights(path, cfg, progress=False)
    params = sum(math.prod(shape) for shape in family_of(cfg).checkpoint_shapes(cfg).values())
    print(json.dumps({"path": str(path), **dataclasses.asdict(cfg), "qk_norm": cfg.qk_norm, "parameters": params,
                      "bytes": w.nbytes}, indent=2))


def cmd_models(args):
    from .hub import DEFAULT_NAME, list_models
    print(f"default: {DEFAULT_NAME}")
    for name, path, size in list_models():
        print(f"{name}\t{size / 1e6:.1f} MB\t{path}")


def cmd_convert(args):
    from .gguf_import import convert_gguf
    convert_gguf(args.src, args.dst, progress=not args.quiet, overwrite=args.overwrite,
                 keep_quantized=not args.dequantize)
    print(f"wrote {args.dst}")


def cmd_quantize(args):
    from .quantize import quantize_model
    quantize_model(args.src, args.dst, group=args.group_size, sym=args.sym, head=args.head, progress=not args.quiet,
                   overwrite=args.overwrite)
    print(f"wrote {args.dst}")


def cmd_bench(args):
    from .bench import bench, format_report
    model = load_model(args)
    r = bench(model, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, repetitions=args.repetitions,
              depth=args.depth)
    print(json.dumps(r) if args.json else format_report(r))


def cmd_merge(args):
    from .merge import merge_adapter
    merge_adapter(args.base, args.adapter_dir, args.out, progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote {args.out}")


def cmd_eval(args):
    from . import evaluate
    model = load_model(args)
    path = evaluate.task_path(args.file, args.task)
    progress = not args.quiet
    if args.task == "perplexity":
        r = evaluate.perplexity(model, evaluate.read_text(path), window=args.window, stride=args.stride,
                                limit=args.limit, progress=progress)
    elif args.task == "choice":
        r = evaluate.choice(model, evaluate.read_jsonl(path, "choice"), limit=args.limit, progress=progress)
    else:
        r = evaluate.generate(model, evaluate.read_jsonl(path, "generate"), max_tokens=args.max_tokens,
                              chat=args.chat, limit=args.limit, progress=progress)
    r = {"file": str(path), **r}
    print(json.dumps(r) if args.json else evaluate.format_result(r))


def cmd_chat(args):
    from .chat import Conversation, Terminal, make_session, repl
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started by nohup or a shell's `&`: Ctrl-C typed in the chat must still stop a reply
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from .styles import STYLES, check_temperature, style_prompt
    if args.list_styles:
        for name, prompt in STYLES.items():
            print(f"{name}\t{prompt}")
        return
    system = None if args.system is None else text_arg(args.system, "--system")
    check_temperature(args.temperature)
    if args.style is not None:
        style_prompt(args.style)
    if args.max_tokens < 1:
        raise TinyhunError(f"--max-tokens {args.max_tokens}: expected an integer >= 1")
    flt = content_filter_of(args)
    tools = None if args.tools is None else json_file(args.tools, "--tools", list)
    if tools is not None:
        from .tool_calls import check_tools
        check_tools(tools)
    model = load_model(args)
    pinned = cli_kv.pin_prompt_cache(model, args)   # noqa: F841  (held: its blocks stay shared while we run)
    conv = Conversation(model, style=args.style, system=system, think=args.think, temperature=args.temperature,
                        max_tokens=args.max_tokens, content_filter=flt, seed=args.seed, tools=tools)
    repl(conv, Terminal(hide_thinking=args.hide_thinking), make_session())


def build_parser():
    from .styles import DEFAULT_TEMPERATURE
    p = argparse.ArgumentParser(prog="tinyhun", description="Run Hunyuan (and Llama) language models on the CPU or an NVIDIA GPU.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_model(sp, runs=True, adapters=False):
        sp.add_argument("--model", help="model folder (default: $MODEL_PATH, else the default model)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        if not runs:   # the options below are for commands that run the model
            return sp
        sp.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default) or cuda: an NVIDIA GPU (needs the `cuda` extra, numba-cuda)")
        cli_kv.add_options(sp, prompt_cache=sp.prog.split()[-1] in ("generate", "chat", "serve"))
        if adapters:   # serve: several adapters, each a model id of its own
            sp.add_argument("--adapter", metavar="[NAME=]DIR", action="append",
                            help="a peft LoRA adapter folder to run on the model; NAME=DIR (repeatable) serves it "
                                 "as model NAME beside the base instead, as a side path over the base's weights")
        else:
            sp.add_argument("--adapter", metavar="DIR", help="a peft LoRA adapter folder to run on the model")
        sp.add_argument("--adapter-mode", choices=("merge", "side"),
                        help="merge it into the weights (default for a float model) or run it beside them "
                             "(default for an INT4 model)")
        return sp

    cli_kv.add_cache_prompt(sub, with_model, load_model)
    g = with_model(sub.add_parser("generate", help="stream a completion of PROMPT"))
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--system", help="system prompt (chat mode)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    shape = g.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid under this schema")
    shape.add_argument("--grammar", metavar="FILE", help="constrain the output to a Lark (or GBNF) grammar")
    shape.add_argument("--regex", help="constrain the output to match this regular expression")
    g.add_argument("--moe-stats", action="store_true",
                   help="after the text, print a mixture-of-experts model's routing statistics to stderr")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the chat template (default when the model has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="complete the prompt as plain text")
    g.set_defaults(func=cmd_generate)

    ch = with_model(sub.add_parser("chat", help="chat with the model in the terminal (streaming, multi-turn)"))
    ch.add_argument("--system", help="system prompt (after the style's preset when both are given)")
    ch.add_argument("--style", help="reply style preset: formal, casual, friendly (see --list-styles)")
    ch.add_argument("--list-styles", action="store_true", help="print the styles and their prompts, then exit")
    think = ch.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None,
                       help="let a thinking model reason first (Hunyuan's default)")
    think.add_argument("--no-think", dest="think", action="store_false", help="answer without reasoning first")
    ch.add_argument("--hide-thinking", action="store_true", help="do not show the reasoning (default: dimmed)")
    ch.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                    help="0.1-1.0 (default 0.3, for steady customer-service replies); 0 = greedy")
    ch.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    ch.add_argument("--seed", type=int)
    ch.add_argument("--tools", metavar="FILE", help="tools to try by hand (OpenAI's JSON list): the chat shows each "
                    "call the model makes and asks for its result")
    ch.add_argument("--blocklist", metavar="FILE", help="more sensitive words, one a line (added to the default list)")
    ch.add_argument("--replace-blocklist", action="store_true", help="use --blocklist FILE instead of the default list")
    ch.add_argument("--no-filter", action="store_true", help="no content filter")
    ch.set_defaults(func=cmd_chat)

    i = with_model(sub.add_parser("info", help="print a model's config, parameter count and bytes"), runs=False)
    i.add_argument("path", nargs="?", help="model folder")
    i.set_defaults(func=lambda a: cmd_info(argparse.Namespace(**{**vars(a), "model": a.path or a.model})))

    m = sub.add_parser("models", help="list the default and the cached models")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("convert", help="convert a GGUF file into a model folder")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dequantize", action="store_true",
                   help="write every tensor as fp32 (default: Q4_0/Q4_1 matrices stay 4-bit, bit for bit)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it is a non-empty folder")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_convert)

    b = with_model(sub.add_parser("bench", help="measure prefill/decode speed (mean ± sd after a warm-up)"))
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--gen-tokens", type=int, default=64)
    b.add_argument("--repetitions", type=int, default=3)
    b.add_argument("--depth", type=int, default=0, help="tokens already in the cache (llama-bench -d)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench)

    ev = sub.add_parser("eval", help="evaluate a model: perplexity, multiple choice, generation")
    tasks = ev.add_subparsers(dest="task", required=True)
    for task, what in (("perplexity", "perplexity of raw text (sliding window)"),
                       ("choice", "multiple choice by log-likelihood (JSONL: context, choices, answer)"),
                       ("generate", "greedy answers scored by exact match / contains (JSONL: prompt, answer)")):
        t = with_model(tasks.add_parser(task, help=what))
        t.add_argument("file", help="task file, or `sample` for the one tinyhun ships")
        t.add_argument("--limit", type=int, help="only the first N items (perplexity: N tokens scored)")
        t.add_argument("--json", action="store_true", help="print one JSON object")
        if task == "perplexity":
            t.add_argument("--window", type=int, help="tokens per window (default min(1024, context))")
            t.add_argument("--stride", type=int, help="tokens between window starts (default window/2)")
        if task == "generate":
            t.add_argument("--max-tokens", type=int, default=64, help="per answer, unless the item sets one")
            mode = t.add_mutually_exclusive_group()
            mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                              help="wrap prompts in the chat template (default when the model has one)")
            mode.add_argument("--raw", dest="chat", action="store_false", help="prompts as plain text")
        t.set_defaults(func=cmd_eval)

    mg = sub.add_parser("merge", help="write a model folder with a peft LoRA adapter merged into its weights")
    mg.add_argument("base", help="float model folder")
    mg.add_argument("adapter_dir", metavar="adapter", help="peft adapter folder (adapter_config.json + "
                    "adapter_model.safetensors)")
    mg.add_argument("out", help="new folder (fp32; `tinyhun quantize` takes it)")
    mg.add_argument("--overwrite", action="store_true", help="replace OUT if it is a non-empty folder")
    mg.add_argument("--quiet", action="store_true")
    mg.set_defaults(func=cmd_merge)

    cli_serve.add_parser(sub, with_model)

    q = sub.add_parser("quantize", help="write an INT4 copy of a model folder")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--group-size", type=int, default=32, help="32 (default), 64 or 128")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="w = (q - 8) * scale (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="w = q * scale + min")
    q.add_argument("--head", choices=("q8", "q4", "f16"), default="q8",
                   help="embedding/lm_head precision (default q8)")
    q.add_argument("--overwrite", action="store_true", help="replace DST if it is a non-empty folder")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)
    return p


def _exit_on(signum, frame):
    raise SystemExit(128 + signum)


def exit_cleanly_on_signals():
    """SIGTERM/SIGHUP (left at their defaults) raise SystemExit, so that `finally` blocks run: a killed convert
    or quantize removes its temp folder. Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):   # no SIGHUP on Windows
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, _exit_on)
    return previous


def one_line_warnings():
    """tinyhun's own warnings (an adapter's base model name, say) print as `tinyhun: warning: ...`."""
    import warnings
    plain = warnings.formatwarning

    def format(message, category, *rest, **kw):
        if category.__module__.startswith("tinyhun"):
            return f"tinyhun: warning: {message}\n"
        return plain(message, category, *rest, **kw)
    warnings.formatwarning = format


def main(argv=None):
    one_line_warnings()
    args = build_parser().parse_args(argv)
    previous = exit_cleanly_on_signals()
    try:
        args.func(args)
    except TinyhunError as e:
        print(f"tinyhun: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
