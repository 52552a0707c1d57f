"""The default model, SmolLM2-135M-Instruct (real trained weights from its GGUF), vs transformers' own GGUF load."""
import numpy as np
import pytest
import torch

import tinyhun
from oracle import assert_logits_close
from tinyhun.generation import generate_step
from tinyhun.sampling import make_sampler

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return tinyhun.load(smollm2_dir)


@pytest.fixture(scope="module")
def oracle(smollm2_transformers):
    model = smollm2_transformers
    model.generation_config.eos_token_id = None   # compare full-length greedy runs
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):\n    ",
                                    "Photosynthesis converts light into", "1, 2, 3, 4, 5,"])
def test_logits_match_transformers(ours, oracle, prompt):
    ids = ours.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0].numpy()
    err = assert_logits_close(ours.logits(ids), ref, rel=1e-3)
    print(f"{prompt!r}: max |Δlogit| {err:.2e} (max |logit| {np.abs(ref).max():.1f})")


def test_chat_answer_names_paris(ours):
    answer = "".join(tinyhun.generate(ours, "What is the capital of France?", max_tokens=40, chat=True))
    assert "Paris" in answer, answer


def test_200_greedy_tokens_equal_transformers(ours, oracle):
    prompt = ours.tokenizer.encode(ours.tokenizer.render_chat(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]), add_special_tokens=False)
    got = list(generate_step(ours, prompt, make_sampler(), 200))
    with torch.no_grad():
        out = oracle.generate(torch.tensor([prompt]), max_new_tokens=200, do_sample=False)
    want = out[0, len(prompt):].tolist()
    assert len(want) == 200
    first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert got == want, f"greedy runs diverge at step {first_diff}"
