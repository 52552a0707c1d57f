"""INT4 end to end on real weights (SmolLM2-135M-Instruct): greedy agreement with fp32 and perplexity on English
text the project ships. The figures are printed (run with -s to see them)."""
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


def greedy_agreement(fp32, q4, prompt, steps=256):
    """fp32 greedy-decodes `steps` tokens; INT4 sees the same tokens (teacher forcing) and predicts each one."""
    tokens = list(generate_step(fp32, prompt, make_sampler(), steps))
    predicted = q4.logits(prompt + tokens[:-1])[len(prompt) - 1:].argmax(axis=-1)
    return float(np.mean(predicted == np.array(tokens)))


@pytest.fixture(scope="module")
def fp32(smollm2_dir):
    return tinyhun.load(smollm2_dir)


@pytest.fixture(scope="module")
def requantized(smollm2_dir, tmp_path_factory):
    # its fp32 weights are dequantized Q4_1, so only asymmetric group-32 codes can represent them again; the
    # embedding shipped as Q8_0 stays 16-bit (a 4-bit one costs about 5 % perplexity on this model)
    out = tmp_path_factory.mktemp("q") / "q4"
    return tinyhun.load(quantize_model(smollm2_dir, out, sym=False, head="f16", progress=False))


@pytest.mark.parametrize("which", ["gguf-q4_1", "tinyhun-quantize-asym32"])
def test_int4_greedy_and_perplexity(which, fp32, smollm2_q4_dir, requantized):
    q4 = tinyhun.load(smollm2_q4_dir) if which == "gguf-q4_1" else requantized
    ids = fp32.tokenizer.encode(TEXT)
    ppl32, ppl4 = perplexity(fp32, ids), perplexity(q4, ids)
    prompt = fp32.tokenizer.encode(fp32.tokenizer.render_chat(
        [{"role": "user", "content": "Explain how a lighthouse works."}]), add_special_tokens=False)
    agree = greedy_agreement(fp32, q4, prompt)
    print(f"\n{which}: {len(ids)} tokens, perplexity fp32 {ppl32:.3f} -> int4 {ppl4:.3f} "
          f"({100 * (ppl4 / ppl32 - 1):+.2f} %), greedy agreement {100 * agree:.1f} % of 256 steps")
    assert ppl4 <= 1.03 * ppl32
    assert agree >= 0.95
