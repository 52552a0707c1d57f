"""The KV cache's side of the `tinyhun` command: --context / --kv-dtype / --kv-memory / --prompt-cache on every
command that runs a model, and `tinyhun cache-prompt`."""
import re
import sys
import time

from .errors import TinyhunError


def add_options(sp, prompt_cache=False):
    sp.add_argument("--context", type=int, help="most tokens a sequence holds (default: the model's "
                    "max_position_embeddings; up to what its RoPE supports)")
    sp.add_argument("--kv-dtype", choices=("fp16", "int8", "fp32"),
                    help="the KV cache's storage: fp16 (default), int8 (a scale per token and head), fp32")
    sp.add_argument("--kv-memory", metavar="SIZE", help="most memory the KV cache may hold, e.g. 2G (default: half "
                    "the memory available); used only as tokens arrive")
    if prompt_cache:
        sp.add_argument("--prompt-cache", metavar="FILE", help="start from a prompt cache (tinyhun cache-prompt): "
                        "prompts beginning with its tokens reuse its keys and values")


def kv_args(args):
    """tinyhun.load's KV options from a command's --context, --kv-dtype, --kv-memory."""
    return {"max_context": args.context, "kv_dtype": args.kv_dtype,
            "kv_memory": None if args.kv_memory is None else size_arg(args.kv_memory, "--kv-memory")}


def size_arg(text, what):
    """'512M', '2G', '1.5GiB', '800000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise TinyhunError(f"{what} {text!r}: expected a size such as 800M or 2G")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def pin_prompt_cache(model, args):
    """The --prompt-cache file read into the model's pool, its cache kept by the caller so its blocks stay."""
    path = getattr(args, "prompt_cache", None)
    if path is None:
        return None
    from . import prompt_cache
    return prompt_cache.load(model, path)


def cmd_cache_prompt(args, load_model):
    from . import prompt_cache
    try:   # strict UTF-8: the text holds no lone surrogates, as the command line's may
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TinyhunError(f"{args.file}: cannot read it as UTF-8 text ({e})") from None
    model = load_model(args)
    tok = model.tokenizer
    if tok is None:
        raise TinyhunError("this model folder has no tokenizer (tokenizer.json or hy.tiktoken)")
    ids = prompt_cache.system_prefix(tok, text) if args.system else tok.encode(text)
    cache = model.new_cache()
    t0 = time.perf_counter()
    model.forward(cache, ids, argmax=True)
    took = time.perf_counter() - t0
    prompt_cache.save(model, cache, args.output, name=args.model)
    print(f"{args.output}: {len(ids)} tokens, {len(ids) * model.kv_pool.token_bytes / 2**20:.1f} MiB of "
          f"{model.kv_dtype} KV, prefilled in {took:.2f} s", file=sys.stderr)


def add_cache_prompt(sub, with_model, load_model):
    cp = with_model(sub.add_parser("cache-prompt", help="prefill a long prompt once and save its KV cache (for "
                                   "--prompt-cache)"))
    cp.add_argument("file", help="UTF-8 text file: the prompt (or with --system the chat's system prompt)")
    cp.add_argument("-o", "--output", required=True, help="the cache file to write (safetensors)")
    cp.add_argument("--system", action="store_true", help="FILE is a system prompt: cache what every chat with it "
                    "starts with, as the chat template renders it")
    cp.set_defaults(func=lambda a: cmd_cache_prompt(a, load_model))
