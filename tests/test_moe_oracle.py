"""The hunyuan_v1_moe family against transformers fp32 on tiny random models (router weights scaled so that no
token's k-th and (k+1)-th experts nearly tie): prefill, step-by-step decode, per-layer top-k, Tencent's widths,
a config without the shared MLP, INT4 against the dequantized model, and the NumPy backend against Numba."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

import tinyhun
from oracle import assert_logits_close, build_hunyuan_moe, oracle_logits
from tinyhun.checkpoint import open_folder
from tinyhun.errors import TinyhunError
from tinyhun.families import load_config
from tinyhun.kernels import q4, q8
from tinyhun.quantize import quantize_model
from tinyhun.weights import check_names, read_tensor

CONFIGS = {   # transformers config overrides: experts and their (and the shared MLP's) width
    "e4-top1": dict(num_experts=4, moe_topk=1),
    "e8-top2": dict(num_experts=8, moe_topk=2),
    "e16-top8": dict(num_experts=16, moe_topk=8, intermediate_size=48),
    "e64-top8": dict(num_experts=64, moe_topk=8, intermediate_size=32),
    "per-layer-topk": dict(num_experts=8, moe_topk=[1, 3]),
}


def oracle(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def edit_folder(folder, tensors=None, config=None):
    """Rewrite a checkpoint folder: tensors(dict) -> dict, config(dict) -> dict."""
    if tensors:
        save_file(tensors(load_file(folder / "model.safetensors")), folder / "model.safetensors")
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_and_decode_match_transformers(tmp_path, name):
    build_hunyuan_moe(tmp_path, seed=7, **CONFIGS[name])
    ref = oracle_logits(oracle(tmp_path), ids := np.random.default_rng(2).integers(0, 256, size=33))
    model = tinyhun.load(tmp_path)
    assert_logits_close(model.logits(ids), ref)
    cache = model.new_cache(len(ids))
    steps = np.concatenate([model.forward(cache, ids[i:i + 1]).copy() for i in range(len(ids))])   # one row each
    assert_logits_close(steps, ref)


def test_numpy_reference_backend_matches_transformers(tmp_path):
    build_hunyuan_moe(tmp_path, seed=8, num_experts=8, moe_topk=2)
    ids = np.random.default_rng(3).integers(0, 256, size=21)
    assert_logits_close(tinyhun.load(tmp_path, kernels="numpy").logits(ids), oracle_logits(oracle(tmp_path), ids))


def test_without_shared_mlp(tmp_path):
    # transformers always adds one shared MLP: its down_proj zeroed, it adds exactly nothing, which is what a
    # checkpoint without one (num_shared_expert 0) must compute
    build_hunyuan_moe(tmp_path, seed=9, num_experts=8, moe_topk=2)
    ref_model = oracle(tmp_path)
    with torch.no_grad():
        for layer in ref_model.model.layers:
            layer.mlp.shared_mlp.down_proj.weight.zero_()
    ids = np.random.default_rng(4).integers(0, 256, size=19)
    edit_folder(tmp_path, tensors=lambda t: {n: v for n, v in t.items() if "shared_mlp" not in n},
                config=lambda c: {**c, "num_shared_expert": 0})
    for kernels in ("numba", "numpy"):
        model = tinyhun.load(tmp_path, kernels=kernels)
        assert not any(layer.mlp.has_shared for layer in model.weights.layers)
        assert_logits_close(model.logits(ids), oracle_logits(ref_model, ids))


def test_tencent_widths(tmp_path):
    # Tencent's configs: experts moe_intermediate_size wide, the shared MLP intermediate_size wide. Built as
    # transformers' model (both 48 wide) with the shared MLP padded to 96 by zero rows/columns, which add nothing
    build_hunyuan_moe(tmp_path, seed=10, num_experts=4, moe_topk=2, intermediate_size=48)
    ids = np.random.default_rng(5).integers(0, 256, size=17)
    ref = oracle_logits(oracle(tmp_path), ids)

    def pad(t):
        for n in list(t):
            if "shared_mlp" in n:
                w = t[n]
                t[n] = np.pad(w, ((0, 48), (0, 0)) if w.shape[0] == 48 else ((0, 0), (0, 48)))
        return t
    edit_folder(tmp_path, pad, lambda c: {**c, "intermediate_size": 96, "moe_intermediate_size": [48, 48],
                                         "num_shared_expert": [1, 1]})
    assert_logits_close(tinyhun.load(tmp_path).logits(ids), ref)
    edit_folder(tmp_path, config=lambda c: {**c, "moe_intermediate_size": 64})
    with pytest.raises(TinyhunError, match=r"experts.0.gate_proj.weight' has shape \[48, 64\], expected \[64, 64\]"):
        tinyhun.load(tmp_path)


@pytest.mark.parametrize("field,value,needle", [
    ("moe_topk", 9, "moe_topk 9 exceeds num_experts 8"),
    ("moe_topk", [2], "expected an integer >= 1 or a list of 2"),
    ("num_experts", 0, "field 'num_experts'=0"),
    ("num_shared_expert", 2, "num_shared_expert 2 is not supported"),
    ("moe_layer_num_skipped", 1, "'moe_layer_num_skipped: 1' is not supported"),
])
def test_bad_moe_config_is_refused_by_name(tmp_path, field, value, needle):
    build_hunyuan_moe(tmp_path, seed=0)
    edit_folder(tmp_path, config=lambda c: {**c, field: value})
    with pytest.raises(TinyhunError, match=needle):
        load_config(tmp_path / "config.json")


def dequantized_copy(src, dst):
    """An fp32 folder holding exactly the weights a quantized folder's kernels see."""
    cfg = load_config(src / "config.json")
    files = open_folder(src)
    shapes = check_names(files, cfg)
    out = {}
    for name in shapes:
        w = read_tensor(files, shapes, src, cfg, name)
        out[name] = (q4.dequantize_q4(w) if isinstance(w, q4.Q4Weight) else
                     q8.dequantize_q8(w) if isinstance(w, q8.Q8Weight) else np.asarray(w, np.float32))
    dst.mkdir()
    save_file(out, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    del config["quantization"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("sym", [True, False])
def test_int4_matches_its_dequantized_fp32(tmp_path, sym):
    build_hunyuan_moe(tmp_path / "f32", seed=11, num_experts=16, moe_topk=2, intermediate_size=64)
    qdir = quantize_model(tmp_path / "f32", tmp_path / "q4", sym=sym, progress=False)
    files = open_folder(qdir)
    assert "model.layers.0.mlp.experts.15.down_proj.qweight" in files        # experts are quantized ...
    assert "model.layers.0.mlp.gate.wg.weight" in files                      # ... the router stays fp32
    model = tinyhun.load(qdir)
    assert type(model.weights.layers[0].mlp.gate).__name__ == "Q4"
    ids = np.random.default_rng(6).integers(0, 256, size=40)
    got = model.logits(ids)
    want = tinyhun.load(dequantized_copy(qdir, tmp_path / "deq")).logits(ids)
    # the only difference left is the int8 rounding of activations inside the INT4/INT8 kernels; the NumPy
    # reference rounds the same way, but a 1-ulp difference upstream can move a value to the next int8 step
    err = assert_logits_close(got, want, rel=2e-2)
    print(f"\nINT4 vs its dequantized fp32: max |dlogit| {err:.3g} (max |logit| {np.abs(want).max():.3g})")
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95
    assert_logits_close(tinyhun.load(qdir, kernels="numpy").logits(ids), got, rel=2e-2)
