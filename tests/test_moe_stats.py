"""Routing statistics (tinyhun.moe_stats, `tinyhun generate --moe-stats`) on the committed tiny MoE checkpoint."""
import numpy as np
import pytest

import tinyhun
from oracle import ROOT
from test_cli import assert_user_error, run
from tinyhun import blocks
from tinyhun.errors import TinyhunError
from tinyhun.families import family_of
from tinyhun.moe_stats import collect, format_report

TINY_MOE = ROOT / "weights" / "tiny-hunyuan-moe"


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY_MOE)


def test_counts_every_routed_token_and_only_while_collecting(model):
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=11)
    cache = model.new_cache(16)
    with collect(model) as stats:
        model.forward(cache, ids)                 # prefill: 11 rows
        model.forward(cache, ids[:1])             # decode: 1 row
    model.forward(cache, ids[:2])                 # not counted
    r = stats.report()
    assert r["tokens"] == 12
    cfg, H = model.config, model.config.hidden_size
    for row, layer in zip(r["layers"], model.weights.layers):
        assert sum(row["load"]) == 12 * cfg.moe_topk[row["layer"]]
        assert row["used"] == np.mean(np.array(row["load"]) > 0)
    total = sum(int(np.prod(s)) for s in family_of(cfg).checkpoint_shapes(cfg).values())
    expert = 3 * H * cfg.moe_intermediate_size[0]
    idle = sum((E - k) * expert for E, k in zip(cfg.num_experts, cfg.moe_topk))
    assert r["total_params"] == total and r["active_params"] == total - idle
    assert "experts used at least once" in format_report(r)


def test_counts_equal_the_reference_routing(monkeypatch):
    # under the NumPy backend blocks.moe_mlp runs as Python: record the router's choices and recount them
    ref = tinyhun.load(TINY_MOE, kernels="numpy")
    seen = []
    route = blocks.route

    def spy(ids, weights, probs, x, router):
        out = route(ids, weights, probs, x, router)
        seen.append(ids.copy())
        return out
    monkeypatch.setattr(blocks, "route", spy)
    with collect(ref) as stats:
        ref.forward(ref.new_cache(8), np.array([5, 9, 200]))
    assert len(seen) == ref.config.num_layers
    for row, ids in zip(stats.report()["layers"], seen):
        np.testing.assert_array_equal(row["load"], np.bincount(ids, minlength=row["experts"]))


def test_dense_model_has_no_routing_statistics():
    with pytest.raises(TinyhunError, match="no mixture-of-experts layers"):
        with collect(tinyhun.load(ROOT / "weights" / "tiny-hunyuan")):
            pass


def test_cli_moe_stats():
    plain = run("generate", "Hello world", "--model", str(TINY_MOE), "--max-tokens", "6", "--raw", "--quiet")
    r = run("generate", "Hello world", "--model", str(TINY_MOE), "--max-tokens", "6", "--raw", "--quiet",
            "--moe-stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout
    assert "moe: 16 tokens routed" in r.stderr and "layer   2 (top-2 of 8)" in r.stderr   # 11 prompt + 5 steps
    assert_user_error(run("generate", "Hi", "--model", str(ROOT / "weights" / "tiny-hunyuan"), "--max-tokens", "2",
                          "--quiet", "--moe-stats"), "no mixture-of-experts layers")
