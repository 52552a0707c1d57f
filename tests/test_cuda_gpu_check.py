"""bench/gpu_check.py end to end with tiny shapes (--tiny), under Numba's CUDA simulator: run by test_cuda_sim.py in
its simulator subprocess (TINYHUN_CUDA_TESTS=1), beside the kernel and model tests. Not run by gpu_check itself."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TINYHUN_CUDA_TESTS") != "1",
                                reason="run by test_cuda_sim.py (simulator subprocess)")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_runs_end_to_end(tmp_path):
    """Every section runs and writes its results: the dense and MoE checkpoints' logits equal the CPU's, decode
    speeds and launches per token of each model (one host launch per token when a step replays as a graph, every
    kernel's without graphs), decode at depth with fp16 and int8 KV (its GB/s counting the KV bytes), the INT4 model
    with a LoRA side path, the GEMV and copy bandwidths."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main([str(tmp_path / "out"), "--tiny"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "errors" not in res and list(res["seconds"]) == ["gemv", "decode", "depth", "lora", "transformers",
                                                            "logits"]
    for name in ("tiny-hunyuan", "tiny-hunyuan-moe-int4"):   # --tiny checks each kind and format once
        assert res["logits"][name]["ok"], (name, res["logits"][name])
    for name in ("int4", "moe fp16"):   # --tiny runs one of each kind
        r = res["decode"][name]
        assert r["decode_tok_s"] > 0 and r["launches_per_token"] > 1 and r["decode_gb_s"] > 0, name
        assert r["host_launches_per_token"] == 1, name
        # tinyhun.bench's own count: its greedy steps also pick the token on the device, one kernel more
        assert r["kernels_per_token"] == r["launches_per_token"] + 1, name
    depth = {r["kv"]: r for r in res["depth"].values()}
    assert set(depth) == {"fp16", "int8"} and all(r["depth"] == 70 and r["decode_tok_s"] > 0 for r in depth.values())
    assert depth["int8"]["kv_gb"] < depth["fp16"]["kv_gb"]   # one byte a value and a scale a head, not two bytes
    for r in depth.values():
        assert r["decode_gb_s"] > r["weight_gb"] * r["decode_tok_s"]   # the KV bytes counted too
    r = res["decode"]["int4 without graphs"]
    assert r["host_launches_per_token"] == r["launches_per_token"] == res["decode"]["int4"]["launches_per_token"]
    assert res["cuda_graph"]["int4"]["ok"] and res["cuda_graph"]["int4"]["decode_speedup"] > 0
    lora = res["decode"]["int4 + LoRA r2 side path (all 7 linears)"]   # four A products more per layer
    assert lora["launches_per_token"] == res["decode"]["int4"]["launches_per_token"] + 4
    assert lora["host_launches_per_token"] == 1 and lora["weight_gb"] > res["decode"]["int4"]["weight_gb"]
    assert res["gemv_int4"]["gb_s"] > 0 and res["copy_gb_s"] > 0
    assert (tmp_path / "out" / "report.md").read_text().strip()


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    """A device session must not lose every figure to one broken section: its error is in results.json and
    report.md, the sections after it still run, and the exit status is 1."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def broken(*a, **kw):
        raise RuntimeError("no such kernel")
    monkeypatch.setattr(gpu_check, "tinyhun_speed", broken)
    monkeypatch.setattr(gpu_check, "depth_speeds", broken)
    monkeypatch.setattr(gpu_check, "compare_logits", lambda *a, **kw: {"rel_err": 0.0, "bound": 1, "ok": True,
                                                                       "argmax_agree": 1.0})
    assert gpu_check.main([str(tmp_path / "out"), "--tiny"]) == 1
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["errors"] == {name: "RuntimeError: no such kernel" for name in ("decode", "depth", "lora")}
    assert res["gemv_int4"]["gb_s"] > 0 and res["logits"]["tiny-hunyuan"]["ok"]   # before and after it
    assert "- section decode FAILED: RuntimeError: no such kernel" in (tmp_path / "out" / "report.md").read_text()
