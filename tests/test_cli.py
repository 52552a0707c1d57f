"""The `tinyhun` command as a user runs it: output, exit codes, one-line errors without tracebacks."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from oracle import ROOT

TINY = ROOT / "weights" / "tiny-hunyuan"


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tinyhun.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def assert_user_error(r, *needles):
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in line, line


def test_generate_streams_text():
    import tinyhun
    model = tinyhun.load(TINY)
    want = "".join(tinyhun.generate(model, "Hello world", max_tokens=12, chat=False))
    r = run("generate", "Hello world", "--model", str(TINY), "--max-tokens", "12", "--raw", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_info_prints_config_and_counts():
    r = run("info", str(TINY))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model_type"] == "hunyuan_v1_dense" and info["num_layers"] == 3
    assert info["bytes"] == info["parameters"] * 4 > 0


@pytest.mark.parametrize("args, needles", [
    (["--top-p", "2"], ["top_p=2.0", "(0, 1]"]),
    (["--temperature", "-0.5"], ["temperature=-0.5"]),
    (["--max-tokens", "100000"], ["exceeds the model's context"]),
])
def test_bad_parameters_exit_2_with_one_line(args, needles):
    assert_user_error(run("generate", "hi", "--model", str(TINY), "--quiet", *args), *needles)


def test_bad_model_folder(tmp_path):
    assert_user_error(run("generate", "hi", "--model", str(tmp_path / "missing")), "no such model folder")
    bad = tmp_path / "bad"
    shutil.copytree(TINY, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 4)
    assert_user_error(run("generate", "hi", "--model", str(bad), "--quiet"), "model.safetensors", "truncated")


@pytest.mark.slow
def test_default_model_is_int4_smollm2_and_streams(smollm2_q4_dir):
    """With no --model the CLI runs SmolLM2 in 4 bits as its GGUF ships. (Whether it names Paris is asserted on the
    fp32 conversion in test_smollm2.py: there "The" leads "L" by 0.09 logits, and int8 activations flip that.)"""
    import tinyhun
    home = smollm2_q4_dir.parent.parent      # <home>/models/<name>
    prompt = "Name three primary colors."
    r = run("generate", prompt, "--max-tokens", "16", "--quiet", env={"TINYHUN_HOME": str(home), "MODEL_PATH": ""})
    assert r.returncode == 0, r.stderr
    model = tinyhun.load(smollm2_q4_dir)
    assert model.config.quantization["source"] == "gguf Q4_1+Q8_0"
    assert r.stdout == "".join(tinyhun.generate(model, prompt, max_tokens=16)) + "\n"
    listing = run("models", env={"TINYHUN_HOME": str(home)})
    assert "SmolLM2-135M-Instruct" in listing.stdout


def test_bench_json_has_the_promised_keys():
    r = run("bench", "--model", str(TINY), "--json", "--quiet", "--prompt-tokens", "8", "--gen-tokens", "4",
            "--repetitions", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb"):
        assert out[key] > 0, key
    assert_user_error(run("bench", "--model", str(TINY), "--gen-tokens", "0", "--quiet"), "gen_tokens=0")


def test_quantize_writes_a_loadable_int4_copy_and_never_overwrites(tmp_path):
    dst = tmp_path / "q4"
    r = run("quantize", str(TINY), str(dst), "--group-size", "32", "--asym", "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"]["group"] == 32 and cfg["quantization"]["sym"] is False
    from tinyhun.checkpoint import SafetensorsFile
    assert json.loads(SafetensorsFile(dst / "model.safetensors").metadata["quantization"]) == cfg["quantization"]
    assert (dst / "model.safetensors").stat().st_size < (TINY / "model.safetensors").stat().st_size / 4
    assert run("generate", "hi", "--model", str(dst), "--max-tokens", "3", "--quiet").returncode == 0
    assert_user_error(run("quantize", str(TINY), str(dst), "--quiet"), "exists and is not empty")
    assert_user_error(run("quantize", str(TINY), str(TINY), "--quiet"), "never overwritten")
    assert_user_error(run("quantize", str(TINY), str(tmp_path / "g"), "--group-size", "48"), "--group-size 48")
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".*partial"))
