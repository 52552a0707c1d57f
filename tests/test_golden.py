"""Golden outputs: greedy token ids of the committed tiny checkpoint, as transformers produced them
(weights/make_tiny.py records the oracle's versions in golden.json)."""
import json

import pytest

import tinyhun
from oracle import ROOT
from tinyhun.generation import encode_prompt, generate_step
from tinyhun.sampling import make_sampler

TINY = ROOT / "weights" / "tiny-hunyuan"
GOLDEN = json.loads((TINY / "golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["prompt"])
def test_greedy_ids_equal_golden(model, case):
    ids = encode_prompt(model.tokenizer, case["prompt"], case["chat"])
    assert ids == case["prompt_ids"]
    got = list(generate_step(model, ids, make_sampler(), len(case["greedy_ids"])))
    assert got == case["greedy_ids"], f"oracle {GOLDEN['oracle']}"
