"""Every GPU check and benchmark of the CUDA backend in one run: `python bench/gpu_check.py OUTDIR [--tiny]`.

Writes OUTDIR/results.json and OUTDIR/report.md again after each section (atomically, so a run cut short leaves
the sections it finished), in this order, most wanted first; a section that fails is recorded (errors) and the next
one runs, and the exit status is 1 if any failed:
  1. INT4 GEMV GB/s against a device-to-device copy measured in the same run;
  2. prefill and decode tok/s for the Hunyuan-0.5B shape (random weights, fp16 and INT4), kernels and host
     launches per token, against transformers bf16 (eager and sdpa) on the same GPU in the same run when torch has
     CUDA; the same for a mixture of experts of that width (MOE_SHAPE), with its decode GB/s over the bytes a token
     reads; the dense decode again without CUDA graphs, and whether replayed steps' logits equal launched ones';
     the dense INT4 decode again with a rank-16 LoRA adapter on all seven linears as a side path (LORA_RANK);
  3. decode at depth: INT4 0.5B shape, DEPTHS tokens already in the cache, fp16 and int8 KV: tok/s, and GB/s of
     what a token reads (the weights' decode bytes + the KV bytes of every cached token);
  4. logits through device "cuda" vs the CPU on the tiny checkpoints, dense and mixture of experts (fp32 and
     INT4), and SmolLM2 when it is here;
  5. the CUDA kernel and model tests on this GPU (tests/test_cuda_kernels.py, test_cuda_attention.py,
     test_cuda_model.py), within --tests-timeout seconds.
--tiny: tiny shapes and no test subprocess, so the whole script runs under Numba's CUDA simulator (the CI test).
"""
import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from tinyhun.kernels.kv import BLOCK

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_models import ROOT, kv_token_bytes, random_model, tiny_checkpoint

SMOLLM2 = Path.home() / ".cache" / "tinyhun" / "models" / "SmolLM2-135M-Instruct"
HUNYUAN_05B = dict(vocab_size=120818, hidden_size=1024, intermediate_size=3584, num_layers=24, num_heads=16,
                   num_kv_heads=8, head_dim=128)
# a mixture of experts of the 0.5B model's attention: 16 experts of half its MLP width, top 2, a shared MLP of their
# width (stacked with them: four of the 17 expert MLPs' weights read per token)
MOE_SHAPE = dict(HUNYUAN_05B, intermediate_size=1792, num_experts=16, moe_topk=2, moe_intermediate_size=1792,
                 num_shared_expert=1)
TINY_SHAPE = dict(vocab_size=32, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                  head_dim=16)
TINY_MOE = dict(TINY_SHAPE, num_experts=3, moe_topk=2, moe_intermediate_size=32, num_shared_expert=1)
LORA_RANK = 16
DEPTHS = (4096, 16384)   # tokens in the cache before the timed decode steps (llama-bench -d)
DEPTH_KINDS = ("fp16", "int8")


def kernel_tests(timeout):
    import os
    import subprocess
    try:
        files = [str(ROOT / "tests" / f"test_cuda_{name}.py") for name in ("kernels", "attention", "model")]
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", *files], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "TINYHUN_CUDA_TESTS": "1"}, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"ok": False, "tail": f"timed out after {timeout} s\n" + out[-3000:]}
    return {"ok": r.returncode == 0, "tail": (r.stdout + r.stderr)[-3000:]}


def compare_logits(path, cpu_kernels, rel, n, exact=False):
    """max |Δlogit| / max |logit| of device cuda vs the CPU over n tokens, and greedy agreement. exact: the CPU
    (NumPy reference, the device's fp16 KV storage) runs the weights as the device sees them, for a model whose
    routing the CPU's int8 activation rounding would change (an INT4 mixture of experts). Both fp16 KV."""
    import tinyhun
    from tinyhun.backends import NumpyBackend
    from tinyhun.backends.cuda_memory import device_view
    from tinyhun.model import Model

    memory = 64 << 20   # n tokens of a small model's KV, many times over
    cpu = tinyhun.load(path, kernels="numpy" if exact else cpu_kernels, max_context=n, kv_dtype="fp16",
                       kv_memory=memory)
    if exact:
        cpu = Model(cpu.config, device_view(cpu.weights), backend=NumpyBackend(), max_context=n, kv_dtype="fp16",
                    kv_memory=memory)
    gpu = tinyhun.load(path, kernels="cuda", max_context=n, kv_dtype="fp16", kv_memory=memory)
    ids = np.random.default_rng(0).integers(0, cpu.config.vocab_size, n)
    a, b = cpu.logits(ids), gpu.logits(ids)
    err = float(np.abs(a - b).max() / np.abs(a).max())
    return {"rel_err": err, "bound": rel, "ok": err <= rel,
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean())}


def depth_speeds(shape, depths, kinds, gen):
    """Decode tok/s of the INT4 model of `shape` with each of `depths` tokens already in a cache of each KV storage
    type in `kinds` (one model, its device weights shared by a pool per kind), greedy steps replayed as CUDA graphs,
    and the GB/s that is of what a token reads. A cache takes its blocks and length without a prefill (its keys and
    values are the pool's zeros): a decode step reads every cached byte whatever it holds, and a 16K prefill would
    cost the device session more than the decode it sets up."""
    from tinyhun.backends.cuda import CudaBackend
    from tinyhun.model import Model
    base = random_model(shape, "int4", CudaBackend(), max(depths) + gen + 4, kv_dtype=kinds[0], caches=1)
    res = {}
    for kind in kinds:
        model = base if kind == base.kv_dtype else Model(
            base.config, base.weights, backend=base.backend, max_context=base.max_context, kv_dtype=kind,
            kv_memory=kv_token_bytes(base.config, kind) * (base.max_context + BLOCK))
        for depth in depths:
            cache = model.new_cache()
            cache.reserve(depth)
            cache.append(np.random.default_rng(depth).integers(0, model.config.vocab_size, depth))
            token = np.array([1])
            for _ in range(2):   # the step runs, then is captured: the timed steps replay its graph
                token[0] = model.forward(cache, token, argmax=True)
            t = time.perf_counter()
            for _ in range(gen):
                token[0] = model.forward(cache, token, argmax=True)
            tok_s = gen / (time.perf_counter() - t)
            kv_bytes = kv_token_bytes(model.config, kind) * (depth + 2 + gen // 2)   # the mean length while timed
            w = model.weights.decode_bytes
            res[f"int4 {kind} KV, {depth} tokens"] = {
                "depth": depth, "kv": kind, "decode_tok_s": tok_s, "weight_gb": w / 1e9, "kv_gb": kv_bytes / 1e9,
                "decode_gb_s": (w + kv_bytes) * tok_s / 1e9}
            del cache   # its blocks back to the pool for the next depth
    return res


def tinyhun_speed(shape, fmt, prompt, gen, reps, launched_too=False, lora_rank=0):
    """tinyhun's prefill and decode tok/s (tinyhun.bench) and kernels and host launch calls per decoded token, with
    decode steps replayed as CUDA graphs; launched_too: the same again on the same model with every kernel launched
    from the host, and whether the graphs' logits equal those (the same tokens from a fresh cache); lora_rank: the
    model with an adapter (random_model)."""
    from tinyhun.backends.cuda import CudaBackend
    from tinyhun.bench import bench
    backend = CudaBackend()
    model = random_model(shape, fmt, backend, prompt + gen + 2, lora_rank)

    def measure(graphs):
        backend.graphs = graphs
        r = bench(model, prompt_tokens=prompt, gen_tokens=gen, repetitions=reps, warmup=1 if reps > 1 else 0)
        cache, steps = model.new_cache(), []
        for t in range(3):   # a graph is captured on a step's second run: the third is a replay
            before = backend.launches, backend.host_launches
            steps.append(model.forward(cache, np.array([t + 1])).copy())
        r["launches_per_token"] = backend.launches - before[0]
        r["host_launches_per_token"] = backend.host_launches - before[1]
        r["weight_gb"] = model.weights.nbytes / 1e9
        r["decode_gb_s"] = model.weights.decode_bytes * r["decode_tok_s"] / 1e9   # bytes a token reads x tokens/s
        return r, steps
    graphed, steps = measure(True)
    if not launched_too:
        return graphed, None
    launched, ref = measure(False)
    graphed["replayed_vs_launched_max_abs_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(steps, ref))
    return graphed, launched


def transformers_speed(shape, prompt, gen, reps, device="cuda"):
    """bf16 prefill and greedy decode tok/s of transformers' HunYuanDenseV1 with random weights, eager and sdpa
    attention (one model, built on the device)."""
    import torch
    from transformers import HunYuanDenseV1Config, HunYuanDenseV1ForCausalLM
    cfg = HunYuanDenseV1Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                               intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                               num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                               head_dim=shape["head_dim"], tie_word_embeddings=True)
    with torch.device(device):
        model = HunYuanDenseV1ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, shape["vocab_size"], (1, prompt), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    res = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        pre, dec = [], []
        with torch.no_grad():
            for _ in range(reps + 1):
                sync()
                t = time.perf_counter()
                out = model(ids, use_cache=True)
                sync()
                pre.append(prompt / (time.perf_counter() - t))
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                t = time.perf_counter()
                for _ in range(gen):
                    out = model(tok, past_key_values=past, use_cache=True)
                    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                tok.item()
                dec.append(gen / (time.perf_counter() - t))
        res[f"transformers bf16 {impl}"] = {"prefill_tok_s": float(np.mean(pre[1:])),
                                            "decode_tok_s": float(np.mean(dec[1:]))}
    return res


def bandwidth(n, k, iters):
    """INT4 GEMV GB/s (bytes of codes + scales per call) and device-to-device copy GB/s (read + write)."""
    from numba import cuda

    from tinyhun.kernels import cuda_linear, cuda_ref, q4
    from tinyhun.kernels.linear import as_linear
    rng = np.random.default_rng(1)
    host = cuda_ref.device_format(as_linear(q4.quantize_q4(rng.standard_normal((n, k), np.float32), 32)))
    w = type(host)(*(cuda.to_device(f) if isinstance(f, np.ndarray) else f for f in host))
    x, out = cuda.to_device(rng.standard_normal((1, k), np.float32)), cuda.device_array((1, n), np.float32)

    def timed(fn):
        fn()
        cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        cuda.synchronize()
        return (time.perf_counter() - t) / iters
    gemv_s = timed(lambda: cuda_linear.linear(out, x, w))
    nbytes = host.words.nbytes + host.scales.nbytes
    a = cuda.to_device(np.zeros(max(nbytes, 1 << 20) // 4, np.float32))
    b = cuda.device_array_like(a)
    copy_s = timed(lambda: b.copy_to_device(a))
    return ({"n": n, "k": k, "bytes": nbytes, "us": gemv_s * 1e6, "gb_s": nbytes / gemv_s / 1e9},
            2 * a.nbytes / copy_s / 1e9)


def device_name(cuda):
    if not hasattr(cuda, "shfl_xor_sync"):
        return "Numba's CUDA simulator"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def report(res):
    """report.md of whatever sections ran (a section that failed is listed with its error)."""
    lines = [f"# tinyhun gpu_check on {res['device']}", ""]
    if "gemv_int4" in res:
        g = res["gemv_int4"]
        lines.append(f"- INT4 GEMV [{g['n']}x{g['k']}]: {g['gb_s']:.1f} GB/s = "
                     f"{100 * g['gb_s'] / res['copy_gb_s']:.0f} "
                     f"% of the measured device copy ({res['copy_gb_s']:.1f} GB/s)")
    for name, r in {**res.get("decode", {}), **res.get("transformers", {})}.items():
        extra = (f", {r['launches_per_token']} kernels and {r['host_launches_per_token']} host launches/token"
                 if "launches_per_token" in r else "")
        extra += f", decode {r['decode_gb_s']:.1f} GB/s of weights read" if "decode_gb_s" in r else ""
        lines.append(f"- {name}: prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s{extra}")
    for name, v in res.get("ratios", {}).items():
        lines.append(f"- {name}: {v:.2f}x")
    for name, r in res.get("depth", {}).items():
        lines.append(f"- decode at depth, {name}: {r['decode_tok_s']:.1f} tok/s, {r['decode_gb_s']:.1f} GB/s of "
                     f"weights ({r['weight_gb']:.2f} GB) + KV ({r['kv_gb']:.2f} GB) read per token")
    for fmt, g in res.get("cuda_graph", {}).items():
        lines.append(f"- CUDA graphs, {fmt}: decode {g['decode_speedup']:.2f}x the speed of launching kernel by "
                     f"kernel; replayed vs launched logits: max |diff| {g['replayed_vs_launched_max_abs_diff']:.3g} -> "
                     f"{'ok' if g['ok'] else 'FAIL'}")
    for name, r in res.get("logits", {}).items():
        lines.append(f"- logits {name}: rel err {r['rel_err']:.2e} (bound {r['bound']}), argmax agree "
                     f"{r['argmax_agree']:.2f} -> {'ok' if r['ok'] else 'FAIL'}")
    if "tests" in res:
        lines.append(f"- CUDA kernel/model tests on this GPU: {'passed' if res['tests']['ok'] else 'FAILED'}")
    for name, err in res.get("errors", {}).items():
        lines.append(f"- section {name} FAILED: {err}")
    lines.append("- seconds per section: " + ", ".join(f"{k} {v}" for k, v in res["seconds"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, no test subprocess (runs under the simulator)")
    p.add_argument("--tests-timeout", type=int, default=240, help="seconds for the kernel/model tests (default 240)")
    args = p.parse_args(argv)
    from numba import cuda

    from tinyhun.folders import atomic_folder, write_json
    from tinyhun.quantize import quantize_model
    tiny = args.tiny
    clock = time.perf_counter()
    res = {"device": device_name(cuda), "seconds": {}}

    def save():
        # after every section: a device session cut short still leaves what ran
        text = report(res)
        with atomic_folder(args.outdir, overwrite=True) as out:
            write_json(out / "results.json", res)
            (out / "report.md").write_text(text)
        return text

    def section(name, fn):
        """Run one section; an error is recorded (and printed) and the next section runs."""
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:   # noqa: BLE001 - one broken section must not cost the device session the others
            traceback.print_exc()
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        res["seconds"][name] = round(time.perf_counter() - t, 1)
        save()
        print(f"{name}: {res['seconds'][name]} s ({time.perf_counter() - clock:.0f} s in all)", flush=True)

    shape, moe_shape, prompt, gen, reps = ((TINY_SHAPE, TINY_MOE, 1, 1, 1) if tiny
                                           else (HUNYUAN_05B, MOE_SHAPE, 128, 64, 3))

    def gemv():   # first: the cheapest section, and a target
        res["gemv_int4"], res["copy_gb_s"] = bandwidth(*((64, 256, 2) if tiny else (14336, 4096, 200)))

    def decode():
        # tiny: one run of each model kind and each format (the simulator's cost is its threads; the model tests
        # run every format through both kinds)
        runs = ((shape, "", "int4"), (moe_shape, "moe ", "fp16")) if tiny else \
            tuple((sh, name, fmt) for sh, name in ((shape, ""), (moe_shape, "moe ")) for fmt in ("fp16", "int4"))
        res["decode"], res["cuda_graph"] = {}, {}
        for sh, name, fmt in runs:
            # the dense model also with every kernel launched from the host: what the graphs save
            graphed, launched = tinyhun_speed(sh, fmt, prompt, gen, reps, launched_too=not name)
            res["decode"][name + fmt] = graphed
            if launched:
                res["decode"][fmt + " without graphs"] = launched
                diff = graphed["replayed_vs_launched_max_abs_diff"]
                res["cuda_graph"][fmt] = {"decode_speedup": graphed["decode_tok_s"] / launched["decode_tok_s"],
                                          "replayed_vs_launched_max_abs_diff": diff, "ok": diff == 0.0}
        print(json.dumps(res["decode"]), flush=True)

    def depth():
        # tiny: two blocks and a bit, each kind (the simulator's cost is its threads)
        res["depth"] = depth_speeds(shape, (70,) if tiny else DEPTHS, DEPTH_KINDS, 1 if tiny else 64)
        print(json.dumps(res["depth"]), flush=True)

    def lora():
        rank = 2 if tiny else LORA_RANK
        name = f"int4 + LoRA r{rank} side path (all 7 linears)"
        res["decode"][name] = tinyhun_speed(shape, "int4", prompt, gen, reps, lora_rank=rank)[0]
        res.setdefault("ratios", {})[f"{name} decode / int4 decode"] = (res["decode"][name]["decode_tok_s"]
                                                                        / res["decode"]["int4"]["decode_tok_s"])

    def versus_transformers():
        if tiny:
            return
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA here: no transformers comparison")
        res["transformers"] = transformers_speed(shape, prompt, gen, reps)
        res.setdefault("ratios", {}).update({
            f"tinyhun {fmt} decode / transformers {impl}": res["decode"][fmt]["decode_tok_s"]
            / res["transformers"][f"transformers bf16 {impl}"]["decode_tok_s"]
            for fmt in ("fp16", "int4") for impl in ("eager", "sdpa")})

    def logits():
        n_ids = 1 if tiny else 64   # tiny: the load path only (the model tests run the GEMMs)
        cpu_kernels = "numpy" if tiny else None
        res["logits"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            # tiny: the dense checkpoint as fp16, the mixture of experts as INT4 (each kind and format once)
            for name, sh, int4s in (("tiny-hunyuan", TINY_SHAPE, (False,) if tiny else (False, True)),
                                    ("tiny-hunyuan-moe", TINY_MOE, (True,) if tiny else (False, True))):
                ckpt = tiny_checkpoint(Path(tmp) / name, sh, name) if tiny else ROOT / "weights" / name
                for int4 in int4s:
                    path = Path(tmp) / f"{name}-int4" if int4 else ckpt
                    if int4:
                        quantize_model(ckpt, path, progress=False)
                    # the CPU rounds activations to int8 for INT4 matmuls, the GPU keeps them fp32: 5e-2 for the
                    # dense model; for the MoE that rounding flips routing (measured 0.14 on tiny-hunyuan-moe), so
                    # its CPU runs the device's view of the weights (1e-4: fp32 summation order only)
                    moe_int4 = int4 and "moe" in name
                    res["logits"][path.name] = compare_logits(path, cpu_kernels, 1e-4 if moe_int4 else 5e-2 if int4
                                                              else 1e-2, n_ids, exact=moe_int4)
        if not tiny and SMOLLM2.is_dir():
            res["logits"]["SmolLM2-135M-Instruct"] = compare_logits(SMOLLM2, None, 5e-2, n_ids)
        print(json.dumps(res["logits"]), flush=True)

    def tests():   # last: the longest, and its kernels compile anew
        res["tests"] = kernel_tests(args.tests_timeout)
        print("tests:", "passed" if res["tests"]["ok"] else "FAILED", flush=True)

    for name, fn in (("gemv", gemv), ("decode", decode), ("depth", depth), ("lora", lora),
                     ("transformers", versus_transformers),
                     ("logits", logits)) + ((("tests", tests),) if not tiny else ()):
        section(name, fn)
    print(save())
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
