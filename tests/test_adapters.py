"""peft LoRA adapters: tinyhun's logits with an adapter (merged, or as a side path, on fp32 and INT4 bases) vs peft's
own model in fp32, and one clear error per kind of bad adapter."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import tinyhun
from oracle import assert_logits_close, build_hunyuan, build_llama, oracle_logits
from tinyhun import TinyhunError
from tinyhun.adapters import TARGETS, AdapterWarning, read_adapter
from tinyhun.model import with_adapter
from tinyhun.kernels import cpu_linear, q4, q8
from tinyhun.kernels.linear import F32, LoRA, Q4, act_scratch, as_linear, linear, side_path
from tinyhun.quantize import quantize_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.random.default_rng(7).integers(0, 256, size=31)


def make_adapter(base_dir, out_dir, seed=0, **lora):
    """peft's model with random LoRA weights (non-zero B: init_lora_weights=False) over base_dir, saved to out_dir."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.fixture(scope="module")
def llama_qv(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    build_llama(root / "base", seed=11)
    peft_model = make_adapter(root / "base", root / "qv", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return root, oracle_logits(peft_model, IDS)


@pytest.mark.parametrize("mode", ["merge", "side"])
@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_qv_adapter_matches_peft(llama_qv, mode, kernels):
    root, want = llama_qv
    model = tinyhun.load(root / "base", adapter=root / "qv", adapter_mode=mode, kernels=kernels)
    wq = model.weights.layers[0].attn.wq
    assert isinstance(wq, F32 if mode == "merge" else LoRA)
    assert isinstance(model.weights.layers[0].attn.wk, F32)   # not a target: untouched
    assert_logits_close(model.logits(IDS), want)
    plain = tinyhun.load(root / "base").logits(IDS)
    assert np.abs(plain - want).max() > 100 * np.abs(model.logits(IDS) - want).max()   # the adapter matters


@pytest.mark.parametrize("mode", ["merge", "side"])
def test_all_modules_rslora_patterns_hunyuan(tmp_path, mode):
    build_hunyuan(tmp_path / "base", seed=12)
    peft_model = make_adapter(tmp_path / "base", tmp_path / "a", seed=1, r=4, lora_alpha=6, target_modules=ALL,
                              use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})
    model = tinyhun.load(tmp_path / "base", adapter=tmp_path / "a", adapter_mode=mode)
    assert_logits_close(model.logits(IDS), oracle_logits(peft_model, IDS))
    if mode == "side":
        assert model.weights.layers[1].mlp.down.a.shape == (2, 96)


def test_decode_through_cache_with_side_path(llama_qv):
    # one row at a time (the decode kernels) equals the prefill
    root, want = llama_qv
    model = tinyhun.load(root / "base", adapter=root / "qv", adapter_mode="side")
    cache = model.new_cache(len(IDS))
    rows = [model.forward(cache, IDS[i:i + 1], out=np.empty((1, 256), np.float32)) for i in range(len(IDS))]
    assert_logits_close(np.concatenate(rows), want)


def test_fp16_side_path_precision(llama_qv):
    """What the fp16 A and B beside a quantized base cost, measured where nothing else rounds: on the fp32 base
    against peft, within 1e-3 of the largest logit (fp16 keeps 11 bits of each entry; the INT4 base's own bound is
    2e-2), while the adapter moves the logits by far more. The NumPy kernels: the Numba ones are held to them."""
    root, want = llama_qv
    base = tinyhun.load(root / "base", kernels="numpy")
    got = side_path_model(base, root / "qv", half=True).logits(IDS)
    err = assert_logits_close(got, want, rel=1e-3)
    assert np.abs(base.logits(IDS) - want).max() > 100 * err


def test_bf16_adapter(llama_qv, tmp_path):
    root, _ = llama_qv
    shutil.copytree(root / "qv", tmp_path / "bf16")
    path = tmp_path / "bf16" / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32, attn_implementation="eager")
    from peft import PeftModel
    oracle = PeftModel.from_pretrained(base, tmp_path / "bf16").eval()
    assert oracle.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    want = oracle_logits(oracle, IDS)
    for mode in ("merge", "side"):
        assert_logits_close(tinyhun.load(root / "base", adapter=tmp_path / "bf16", adapter_mode=mode).logits(IDS),
                            want)


def dequantized(model):
    """The same Model with every INT4 linear of its layers replaced by its fp32 dequantization."""
    def f32(lin):
        return F32(q4.dequantize_q4(lin.weight())[:lin.n]) if isinstance(lin, Q4) else lin
    layers = tuple(l._replace(attn=l.attn._replace(**{k: f32(getattr(l.attn, k)) for k in ("wq", "wk", "wv", "wo")}),
                              mlp=l.mlp._replace(**{k: f32(getattr(l.mlp, k)) for k in ("gate", "up", "down")}))
                   for l in model.weights.layers)
    return tinyhun.Model(model.config, model.weights._replace(layers=layers), backend=model.backend)


def side_path_model(model, adapter_dir, half):
    """model with an adapter as a side path whose A and B are fp16 (half) or float32, whatever the base (attach
    makes them fp16 beside quantized bases only)."""
    layers = list(model.weights.layers)
    for (i, target), u in read_adapter(adapter_dir).updates.items():
        sub, field = TARGETS[target]
        block = getattr(layers[i], sub)
        lora = side_path(getattr(block, field), u.a, u.b, u.scale, half=half)
        layers[i] = layers[i]._replace(**{sub: block._replace(**{field: lora})})
    return tinyhun.Model(model.config, model.weights._replace(layers=tuple(layers)), backend=model.backend)


def test_int4_base_with_side_adapter(tmp_path):
    """QLoRA-style: the base stays INT4 and the adapter runs beside it. Reference: the same INT4 weights
    dequantized to fp32 with the adapter merged, within the INT4 kernels' tolerance (their int8 activations:
    2 % of the largest logit, the bound the same comparison without an adapter also meets)."""
    build_llama(tmp_path / "base", seed=13)
    make_adapter(tmp_path / "base", tmp_path / "a", seed=2, r=4, lora_alpha=8, target_modules=ALL)
    quantize_model(tmp_path / "base", tmp_path / "base-q4", progress=False)
    plain = tinyhun.load(tmp_path / "base-q4")
    assert_logits_close(plain.logits(IDS), dequantized(plain).logits(IDS), rel=2e-2)
    model = tinyhun.load(tmp_path / "base-q4", adapter=tmp_path / "a")   # default for a quantized base: side
    assert isinstance(model.weights.layers[0].attn.wq, LoRA) and isinstance(model.weights.layers[0].attn.wq.base, Q4)
    ref = with_adapter(dequantized(plain), tmp_path / "a", mode="merge").logits(IDS)
    assert_logits_close(model.logits(IDS), ref, rel=2e-2)
    with pytest.raises(TinyhunError, match="cannot merge into Q4 weights"):
        tinyhun.load(tmp_path / "base-q4", adapter=tmp_path / "a", adapter_mode="merge")


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["f32", "q4", "q8"]), n=st.integers(1, 70), k32=st.integers(1, 3),
       r=st.integers(1, 8), t=st.sampled_from([1, 2, 5, 39, 40, 57]), seed=st.integers(0, 2**16))
def test_lora_kernel_matches_reference(kind, n, k32, r, t, seed):
    """kernels/linear.py's LoRA as attach makes it (fp32 A/B beside a float base, fp16 beside a quantized one): the
    Numba kernel (inside compiled code and from Python) vs the NumPy reference, within fp32 rounding of the terms
    summed (the base kernels' own bound, tests/test_q4.py)."""
    rng = np.random.default_rng(seed)
    k = 32 * k32
    w = rng.standard_normal((n, k)).astype(np.float32)
    base = {"f32": lambda: as_linear(w), "q4": lambda: as_linear(q4.quantize_q4(w, group=32, sym=bool(seed % 2))),
            "q8": lambda: as_linear(q8.quantize_q8(w))}[kind]()
    a, b = rng.standard_normal((r, k)).astype(np.float32), rng.standard_normal((n, r)).astype(np.float32)
    lora = side_path(base, a, b, 0.7, half=kind != "f32")
    assert lora.a.dtype == (np.float32 if kind == "f32" else np.uint16)
    x = rng.standard_normal((t, k)).astype(np.float32)
    acts = act_scratch(64, max(k, 4 * r))
    want = np.zeros((t, n), np.float32)
    linear(want, x, lora, acts)
    terms = np.abs(x) @ np.abs(w).T * 1.2 + 0.7 * (np.abs(x) @ np.abs(a).T) @ np.abs(b).T
    for run in (_compiled_linear, cpu_linear.matmul):
        got = np.full((t, n), np.nan, np.float32)
        run(got, x, lora, acts)
        assert np.all(np.abs(got - want) <= 1e-5 * terms + 1e-30)
    # fp16 storage rounds each entry of A and B to 11 significant bits: the update is within 2^-10 of the sum of its
    # terms' sizes of the exact fp32 one
    plain = np.empty_like(want)
    linear(plain, x, base, acts)
    assert np.all(np.abs((want - plain) - 0.7 * (x @ a.T) @ b.T) <=
                  (1e-5 if kind == "f32" else 2.0 ** -10) * 0.7 * (np.abs(x) @ np.abs(a).T) @ np.abs(b).T + 1e-4)


@njit
def _compiled_linear(out, x, w, acts):
    linear(out, x, w, acts)


def test_several_adapters_share_one_base(llama_qv, tmp_path):
    root, want = llama_qv
    base = tinyhun.load(root / "base")
    make_adapter(root / "base", tmp_path / "other", seed=5, r=2, lora_alpha=4, target_modules=["o_proj"])
    a, b = with_adapter(base, root / "qv", mode="side"), with_adapter(base, tmp_path / "other", mode="side")
    assert a.weights.layers[0].attn.wq.base.w is base.weights.layers[0].attn.wq.w   # no copy of the base
    assert a.weights.layers[0].attn.wk.w is b.weights.layers[0].attn.wk.w
    assert_logits_close(a.logits(IDS), want)
    assert not np.allclose(b.logits(IDS), want)


# ---- bad adapters ------------------------------------------------------------------------------------------------

def edited(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_pickle_only_adapter_refused(llama_qv, tmp_path):
    root, _ = llama_qv
    shutil.copytree(root / "qv", tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(TinyhunError, match=r"adapter_model.bin: a pickle, which tinyhun never loads"):
        tinyhun.load(root / "base", adapter=tmp_path / "a")


def test_shape_mismatch_refused(llama_qv, tmp_path):
    root, _ = llama_qv
    build_llama(tmp_path / "wide", seed=1, hidden_size=96)
    with pytest.raises(TinyhunError, match=r"lora_A \[4, 64\] / lora_B \[64, 4\] do not fit q_proj of shape "
                                           r"\[64, 96\].*another base model"):
        tinyhun.load(tmp_path / "wide", adapter=root / "qv")


def test_unknown_target_modules_refused(llama_qv, tmp_path):
    root, _ = llama_qv
    make_adapter(root / "base", tmp_path / "head", r=2, lora_alpha=2, target_modules=["lm_head"])
    with pytest.raises(TinyhunError, match=r"target module 'lm_head' is not supported"):
        tinyhun.load(root / "base", adapter=tmp_path / "head")
    # a regex target_modules is checked through the tensors
    with pytest.raises(TinyhunError, match=r"tensor 'base_model.model.lm_head[.\w]+': not a LoRA weight of "
                                           "a supported target module"):
        tinyhun.load(root / "base", adapter=edited(tmp_path / "head", tmp_path / "re", target_modules=".*head"))
    with pytest.raises(TinyhunError, match=r"target module 'embed_tokens' is not supported"):
        tinyhun.load(root / "base", adapter=edited(root / "qv", tmp_path / "e", target_modules=["q_proj",
                                                                                                "embed_tokens"]))


@pytest.mark.parametrize("change, message", [
    (dict(use_dora=True), "use_dora=True: DoRA is not supported"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(peft_type="IA3"), "peft_type 'IA3', expected 'LORA'"),
    (dict(r=0), "r=0, expected a positive integer"),
    (dict(r=8), r"expected rank 8 \(r\)"),
    (dict(bias="all"), "trained biases are not supported"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out=true"),
])
def test_bad_config_refused(llama_qv, tmp_path, change, message):
    root, _ = llama_qv
    with pytest.raises(TinyhunError, match=message):
        tinyhun.load(root / "base", adapter=edited(root / "qv", tmp_path / "a", **change))


def test_base_model_mismatch_warns(llama_qv, tmp_path):
    root, want = llama_qv
    a = edited(root / "qv", tmp_path / "a", base_model_name_or_path="someone/Other-Model-7B")
    with pytest.warns(AdapterWarning, match="'someone/Other-Model-7B' does not look like the base model 'base'"):
        model = tinyhun.load(root / "base", adapter=a)
    assert_logits_close(model.logits(IDS), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tinyhun.load(root / "base", adapter=root / "qv")   # peft wrote the base's own path: no warning


def test_missing_partner_and_bad_mode(llama_qv, tmp_path):
    root, _ = llama_qv
    shutil.copytree(root / "qv", tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, path)
    with pytest.raises(TinyhunError, match=r"layers.1.self_attn.v_proj.lora_A.weight' has no lora_B partner"):
        tinyhun.load(root / "base", adapter=tmp_path / "a")
    with pytest.raises(TinyhunError, match=r"adapter_mode='fused': expected one of merge, side"):
        tinyhun.load(root / "base", adapter=root / "qv", adapter_mode="fused")
    with pytest.raises(TinyhunError, match="not an adapter folder"):
        tinyhun.load(root / "base", adapter=tmp_path / "missing")
    with pytest.raises(TinyhunError, match="adapter_mode='side' given without an adapter"):
        tinyhun.load(root / "base", adapter_mode="side")


def test_rank_too_large_for_side_path(llama_qv, tmp_path):
    root, _ = llama_qv
    make_adapter(root / "base", tmp_path / "big", r=32, lora_alpha=32, target_modules=["q_proj"])
    with pytest.raises(TinyhunError, match=r"rank 32 is too large for the side path.*at most 16"):
        tinyhun.load(root / "base", adapter=tmp_path / "big", adapter_mode="side")
    tinyhun.load(root / "base", adapter=tmp_path / "big")   # merged: any rank
