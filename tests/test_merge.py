"""`tinyhun merge BASE ADAPTER OUT`: the merged folder runs as base + adapter does (and as peft's merged model),
quantizes, and a failed merge leaves nothing behind."""
import json
import shutil

import numpy as np
import pytest

import tinyhun
from oracle import ROOT, assert_logits_close, oracle_logits
from test_adapters import ALL, make_adapter
from tinyhun import TinyhunError
from tinyhun.cli import main
from tinyhun.merge import merge_adapter
from tinyhun.quantize import quantize_model

IDS = np.random.default_rng(8).integers(0, 256, size=25)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    shutil.copytree(ROOT / "weights" / "tiny-hunyuan", root / "base")   # has a tokenizer
    peft_model = make_adapter(root / "base", root / "a", seed=3, r=4, lora_alpha=8, target_modules=ALL)
    want = oracle_logits(peft_model.merge_and_unload(), IDS)
    return root, want


def test_merged_folder_equals_base_plus_adapter(pair, tmp_path):
    root, want = pair
    assert main(["merge", str(root / "base"), str(root / "a"), str(tmp_path / "m"), "--quiet"]) == 0
    merged = tinyhun.load(tmp_path / "m")
    assert merged.tokenizer is not None
    got = merged.logits(IDS)
    np.testing.assert_array_equal(got, tinyhun.load(root / "base", adapter=root / "a").logits(IDS))
    assert_logits_close(got, want)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float32"
    # quantizable, and the adapter survives it: the INT4 copy is nearer the merged model than the base
    q = tinyhun.load(quantize_model(tmp_path / "m", tmp_path / "q", progress=False)).logits(IDS)
    base = tinyhun.load(root / "base").logits(IDS)
    assert np.abs(q - got).mean() < 0.5 * np.abs(q - base).mean()


def test_merge_errors_leave_nothing(pair, tmp_path, capsys):
    root, _ = pair
    quantize_model(root / "base", tmp_path / "q4", progress=False)
    with pytest.raises(TinyhunError, match="already quantized.*merge the adapter into the float checkpoint"):
        merge_adapter(tmp_path / "q4", root / "a", tmp_path / "out", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["merge", str(root / "base"), str(root / "a"), str(tmp_path / "full"), "--quiet"]) == 2
    assert "folder exists and is not empty" in capsys.readouterr().err
    assert main(["merge", str(root / "base"), str(tmp_path / "nope"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "q4"]   # no output, no temp folder


def test_cli_adapter_flag(pair, capsys):
    root, _ = pair
    args = ["generate", "hello", "--raw", "--max-tokens", "4", "--model", str(root / "base"), "--quiet"]
    assert main(args + ["--adapter", str(root / "a")]) == 0
    with_adapter = capsys.readouterr().out
    assert main(args + ["--adapter", str(root / "a"), "--adapter-mode", "side"]) == 0
    assert capsys.readouterr().out == with_adapter
    assert main(args + ["--adapter", str(root / "missing")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
