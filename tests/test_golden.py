"""Golden outputs: greedy token ids of the committed tiny checkpoints (dense and mixture of experts), as
transformers produced them (weights/make_tiny.py records the oracle's versions in golden.json)."""
import json

import pytest

import tinyhun
from oracle import ROOT
from tinyhun.generation import encode_prompt, generate_step
from tinyhun.sampling import make_sampler

CHECKPOINTS = ("tiny-hunyuan", "tiny-hunyuan-moe")
GOLDEN = {name: json.loads((ROOT / "weights" / name / "golden.json").read_text(encoding="utf-8"))
          for name in CHECKPOINTS}
CASES = [(name, case) for name in CHECKPOINTS for case in GOLDEN[name]["cases"]]


@pytest.fixture(scope="module")
def models():
    return {name: tinyhun.load(ROOT / "weights" / name) for name in CHECKPOINTS}


@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}:{c['prompt']}" for n, c in CASES])
def test_greedy_ids_equal_golden(models, name, case):
    model = models[name]
    ids = encode_prompt(model.tokenizer, case["prompt"], case["chat"])
    assert ids == case["prompt_ids"]
    got = list(generate_step(model, ids, make_sampler(), len(case["greedy_ids"])))
    assert got == case["greedy_ids"], f"oracle {GOLDEN[name]['oracle']}"
