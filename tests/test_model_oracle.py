"""tinyhun's fp32 forward vs transformers' eager fp32 forward on tiny random models."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import tinyhun
from oracle import assert_logits_close, build_hunyuan, build_llama, oracle_logits

CONFIGS = {
    "gqa1-tied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "gqa4-tied": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, head_dim=8),
    "hd128-gqa2": dict(hidden_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=128),
    "legacy-rope-keys": dict(rope_parameters=None, rope_theta=10000.0,
                             rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0}),
    "plain-rope": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def load_pair(tmp_path, build, **kw):
    build(tmp_path, **kw)
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    return tinyhun.load(tmp_path), oracle


@pytest.mark.parametrize("name", CONFIGS)
def test_hunyuan_logits_match_transformers(tmp_path, name):
    ours, oracle = load_pair(tmp_path, build_hunyuan, seed=3, **CONFIGS[name])
    ids = np.random.default_rng(1).integers(0, 256, size=37)
    assert_logits_close(ours.logits(ids), oracle_logits(oracle, ids))


@pytest.mark.slow
def test_long_positions_with_alpha(tmp_path):
    # positions up to 2048: a wrong RoPE base or fp64-vs-fp32 angle drift shows here
    ours, oracle = load_pair(tmp_path, build_hunyuan, seed=5, num_hidden_layers=1)
    ids = np.random.default_rng(2).integers(0, 256, size=2048)
    assert_logits_close(ours.logits(ids), oracle_logits(oracle, ids))


def test_llama_without_qk_norm(tmp_path):
    ours, oracle = load_pair(tmp_path, build_llama, seed=4)
    assert not ours.config.qk_norm
    ids = np.random.default_rng(3).integers(0, 256, size=29)
    assert_logits_close(ours.logits(ids), oracle_logits(oracle, ids))


def test_oracle_applies_alpha(tmp_path):
    """transformers logs that it does not recognise `alpha`, yet applies it; a version that silently dropped it would
    agree with a wrong engine, so pin its inverse frequencies to the formula."""
    _, oracle = load_pair(tmp_path, build_hunyuan, seed=0)
    d, theta, alpha = 16, 10000.0, 1000.0
    base = theta * alpha ** (d / (d - 2))
    expected = 1.0 / base ** (np.arange(0, d, 2) / d)
    got = oracle.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert not np.allclose(got, 1.0 / theta ** (np.arange(0, d, 2) / d), rtol=1e-2)
    assert tinyhun.load(tmp_path).config.rope_base == pytest.approx(base)


@pytest.mark.parametrize("chunk", [1, 5, 128])
def test_decode_through_cache_equals_prefill(tmp_path, chunk):
    build_hunyuan(tmp_path, seed=6)
    model = tinyhun.load(tmp_path)
    ids = np.random.default_rng(4).integers(0, 256, size=23)
    full = model.logits(ids)
    state = model.new_cache(len(ids))
    rows = [model.forward(state, ids[i:i + chunk], out=np.empty((len(ids[i:i + chunk]), 256), np.float32))
            for i in range(0, len(ids), chunk)]
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=1e-5 * np.abs(full).max())
    # last-token logits of a decode step equal the full forward's last row
    state = model.new_cache(len(ids))
    model.forward(state, ids[:-1])
    last = model.forward(state, ids[-1:])
    np.testing.assert_allclose(last[0], full[-1], rtol=0, atol=1e-5 * np.abs(full).max())
