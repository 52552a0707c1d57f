"""`tinyhun bench`: prefill and decode speed of a model, llama-bench style (mean ± sd after a warm-up)."""
import resource
import statistics
import time

import numpy as np

from .errors import TinyhunError


def launch_counts(model):
    """(kernels run, host launch calls) so far for a backend that launches kernels (CUDA), else (0, 0)."""
    b = model.backend
    return (b.launches, b.host_launches) if hasattr(b, "host_launches") else (0, 0)


def timed_run(model, cache, depth, prompt, gen_tokens):
    """One prefill of `prompt` then `gen_tokens` greedy decode steps (as generate's), after the `depth` tokens the
    cache holds; returns (prefill_s, ttft_s, decode_s, (kernels, host launches) of the decode steps)."""
    cache.trim(depth)
    t0 = time.perf_counter()
    logits = model.forward(cache, prompt)[0]
    t1 = time.perf_counter()
    token = np.array([int(np.argmax(logits))])
    ttft = time.perf_counter() - t0
    before = launch_counts(model)
    t2 = time.perf_counter()
    for _ in range(gen_tokens):   # greedy, picked where the logits are (on a GPU only the token comes down)
        token[0] = model.forward(cache, token, argmax=True)
    t3 = time.perf_counter()
    return t1 - t0, ttft, t3 - t2, tuple(b - a for a, b in zip(before, launch_counts(model)))


def peak_rss_mb():
    """This process's peak resident memory. VmHWM, not getrusage: Linux carries ru_maxrss across exec, so a process
    started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(model, prompt_tokens=128, gen_tokens=32, repetitions=3, warmup=1, seed=0, depth=0):
    """depth: tokens already in the cache before each run (llama-bench's -d): both the prefill and the decode
    attend to them."""
    for name, v, lo in (("prompt_tokens", prompt_tokens, 1), ("gen_tokens", gen_tokens, 1),
                        ("repetitions", repetitions, 1), ("warmup", warmup, 0), ("depth", depth, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise TinyhunError(f"{name}={v!r}: expected an integer >= {lo}")
    if depth + prompt_tokens + gen_tokens + 1 > model.max_context:
        raise TinyhunError(f"depth + prompt_tokens + gen_tokens = {depth + prompt_tokens + gen_tokens} exceeds the "
                           f"model's context of {model.max_context}")
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.config.vocab_size, size=prompt_tokens)
    cache = model.new_cache(depth + prompt_tokens + gen_tokens + 1)
    if depth:
        model.forward(cache, rng.integers(0, model.config.vocab_size, size=depth), argmax=True)
    runs = [timed_run(model, cache, depth, prompt, gen_tokens) for _ in range(warmup + repetitions)][warmup:]
    prefill_s, ttft_s, decode_s = (np.array(col) for col in list(zip(*runs))[:3])
    kernels, host = runs[-1][3]
    prefill_tps = prompt_tokens / prefill_s
    decode_tps = gen_tokens / decode_s
    kv_token = model.kv_pool.token_bytes
    # a decoded token reads the weights and the keys and values of every token before it (mean over the run)
    bytes_per_token = model.weights.decode_bytes + kv_token * (depth + prompt_tokens + gen_tokens // 2)

    def sd(a):
        return statistics.stdev(a) if len(a) > 1 else 0.0

    return {
        "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repetitions": repetitions, "depth": depth,
        "kv_dtype": model.kv_dtype, "kv_bytes_per_token": kv_token,
        "prefill_tok_s": float(prefill_tps.mean()), "prefill_tok_s_sd": sd(prefill_tps),
        "decode_tok_s": float(decode_tps.mean()), "decode_tok_s_sd": sd(decode_tps),
        "ttft_s": float(ttft_s.mean()),
        "decode_gb_s": float(decode_tps.mean() * bytes_per_token / 1e9),
        "bytes_per_token": int(bytes_per_token),
        "peak_rss_mb": peak_rss_mb(),
        "kernels_per_token": kernels / gen_tokens,   # 0 on the CPU
        "host_launches_per_token": host / gen_tokens,   # below kernels when steps replay as CUDA graphs
    }


def format_report(r):
    return (f"prefill {r['prefill_tok_s']:.1f} ± {r['prefill_tok_s_sd']:.1f} tok/s ({r['prompt_tokens']} tokens)\n"
            f"decode  {r['decode_tok_s']:.2f} ± {r['decode_tok_s_sd']:.2f} tok/s ({r['gen_tokens']} tokens), "
            f"{r['decode_gb_s']:.2f} GB/s of weights and KV"
            + (f", {r['depth']} tokens deep" if r["depth"] else "") + "\n"
            f"kv      {r['kv_dtype']}, {r['kv_bytes_per_token'] / 1024:.1f} KiB per token of context\n"
            f"ttft    {r['ttft_s'] * 1000:.1f} ms\n"
            + (f"launches {r['kernels_per_token']:.1f} kernels/token, {r['host_launches_per_token']:.1f} from the "
               "host (CUDA graphs replay the rest)\n" if r["kernels_per_token"] else "")
            + f"peak RSS {r['peak_rss_mb']:.0f} MB")
