"""INT4 end to end on real weights (SmolLM2-135M-Instruct): greedy agreement with fp32 and perplexity on English
text the project ships. The figures are printed (run with -s to see them)."""
from types import SimpleNamespace

import numpy as np
import pytest

import tinyhun
from oracle import ROOT
from tinyhun.generation import generate_step
from tinyhun.quantize import quantize_model
from tinyhun.sampling import make_sampler

pytestmark = pytest.mark.slow
TEXT = (ROOT / "tests" / "data" / "english.txt").read_text(encoding="utf-8")


def perplexity(model, ids):
    logits = model.logits(ids[:-1]).astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def greedy_agreement(q4, prompt, tokens):
    """INT4 sees fp32's greedy tokens (teacher forcing) and predicts each one: the share it predicts alike."""
    predicted = q4.logits(prompt + tokens[:-1])[len(prompt) - 1:].argmax(axis=-1)
    return float(np.mean(predicted == np.array(tokens)))


@pytest.fixture(scope="module")
def fp32(smollm2_dir):
    """fp32's side of both comparisons, computed once: the text's ids and perplexity, a chat prompt and the
    256 tokens fp32 greedy-decodes from it."""
    model = tinyhun.load(smollm2_dir)
    ids = model.tokenizer.encode(TEXT)
    prompt = model.tokenizer.encode(model.tokenizer.render_chat(
        [{"role": "user", "content": "Explain how a lighthouse works."}]), add_special_tokens=False)
    tokens = list(generate_step(model, prompt, make_sampler(), 256))
    return SimpleNamespace(ids=ids, ppl=perplexity(model, ids), prompt=prompt, tokens=tokens)


@pytest.fixture(scope="module")
def requantized(smollm2_dir, tmp_path_factory):
    # its fp32 weights are dequantized Q4_1, so only asymmetric group-32 codes can represent them again; the
    # embedding shipped as Q8_0 stays 16-bit (a 4-bit one costs about 5 % perplexity on this model)
    out = tmp_path_factory.mktemp("q") / "q4"
    return tinyhun.load(quantize_model(smollm2_dir, out, sym=False, head="f16", progress=False))


@pytest.mark.parametrize("which", ["gguf-q4_1", "tinyhun-quantize-asym32"])
def test_int4_greedy_and_perplexity(which, fp32, smollm2_q4_dir, requantized):
    q4 = tinyhun.load(smollm2_q4_dir) if which == "gguf-q4_1" else requantized
    ppl4 = perplexity(q4, fp32.ids)
    agree = greedy_agreement(q4, fp32.prompt, fp32.tokens)
    print(f"\n{which}: {len(fp32.ids)} tokens, perplexity fp32 {fp32.ppl:.3f} -> int4 {ppl4:.3f} "
          f"({100 * (ppl4 / fp32.ppl - 1):+.2f} %), greedy agreement {100 * agree:.1f} % of 256 steps")
    assert ppl4 <= 1.03 * fp32.ppl
    assert agree >= 0.95
