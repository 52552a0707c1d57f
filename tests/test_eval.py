"""`tinyhun eval`: perplexity and multiple-choice scores vs the same numbers computed from transformers' fp32
logits; generation scoring; task files; the command."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import tinyhun
from oracle import ROOT
from tinyhun import TinyhunError, evaluate
from tinyhun.cli import main

TINY = ROOT / "weights" / "tiny-hunyuan"


@pytest.fixture(scope="module")
def ours():
    return tinyhun.load(TINY)


@pytest.fixture(scope="module")
def oracle():
    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, attn_implementation="eager").eval()


def hf_strided_perplexity(model, ids, window, stride):
    """transformers' strided perplexity recipe (docs: perplexity of fixed-length models), counting each window's
    scored tokens exactly (the labels left after the shift)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        input_ids = torch.tensor([ids[begin:end]])
        target = input_ids.clone()
        target[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        n = int((target[:, 1:] != -100).sum())
        nll += float(loss) * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return float(np.exp(nll / count)), count


@pytest.mark.parametrize("window, stride", [(64, 24), (50, 49), (300, 100)])
def test_perplexity_matches_transformers(ours, oracle, window, stride):
    text = evaluate.read_text(evaluate.SAMPLES["perplexity"])
    r = evaluate.perplexity(ours, text, window=window, stride=stride, limit=240)
    ids = ours.tokenizer.encode(text)[:241]
    want, count = hf_strided_perplexity(oracle, ids, window, stride)
    assert r["tokens"] == count == len(ids) - 1   # every token after the first scored exactly once
    assert r["perplexity"] == pytest.approx(want, rel=1e-4)
    assert r["tokens_per_s"] > 0 and r["tokens_run"] >= r["tokens"]


def test_choice_scores_match_transformers(ours, oracle):
    items = evaluate.read_jsonl(evaluate.SAMPLES["choice"], "choice")[:3]
    r = evaluate.choice(ours, items)
    tok = ours.tokenizer
    for item, row in zip(items, r["per_item"]):
        ctx = tok.encode(item["context"])
        want = []
        for c in item["choices"]:
            cont = tok.encode(c, add_special_tokens=False)
            with torch.no_grad():
                logits = oracle(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].double()
            want.append(float(torch.log_softmax(logits, -1)[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        np.testing.assert_allclose(row["scores"], want, rtol=0, atol=1e-3)
        np.testing.assert_allclose(row["scores_norm"], np.array(want) / [len(c) for c in item["choices"]], atol=1e-4)
        assert row["pick"] == int(np.argmax(want))
    assert r["accuracy"] == np.mean([row["pick"] == row["answer"] for row in r["per_item"]])
    lo, hi = r["accuracy_95"]
    assert 0 <= lo <= r["accuracy"] <= hi <= 1


def test_wilson_interval():
    assert evaluate.wilson(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)   # textbook values
    assert evaluate.wilson(0, 5)[0] == 0.0 and evaluate.wilson(5, 5)[1] == 1.0


def test_generate_scoring(ours):
    prompt = "Where is my order?"
    answer = "".join(tinyhun.generate(ours, prompt, max_tokens=8))
    assert answer.strip()
    items = [{"prompt": prompt, "answer": [answer.upper() + " "], "max_tokens": 8},          # exact, normalised
             {"prompt": prompt, "answer": ["no such reply", answer.strip()[1:]], "max_tokens": 8},  # contains only
             {"prompt": prompt, "answer": ["no such reply"], "max_tokens": 8}]
    r = evaluate.generate(ours, items)
    assert [(row["exact"], row["contains"]) for row in r["per_item"]] == [(True, True), (False, True),
                                                                          (False, False)]
    assert r["exact_match"] == pytest.approx(1 / 3) and r["contains"] == pytest.approx(2 / 3)
    assert 3 <= r["tokens"] <= 24


def test_bad_task_files(tmp_path, ours):
    bad = tmp_path / "bad.jsonl"
    for line, message in [('{"context": "a", "choices": ["x"], "answer": 0}', r"bad.jsonl:2: 'choices' must be"),
                          ('{"context": "a", "choices": ["x", "y"], "answer": 2}', r"bad.jsonl:2: 'answer' must be"),
                          ('{"context": "a", "choices": ["x", "y"]', r"bad.jsonl:2: not valid JSON"),
                          ('[1, 2]', r"bad.jsonl:2: expected a JSON object")]:
        bad.write_text('{"context": "a", "choices": ["x", "y"], "answer": 1}\n' + line + "\n")
        with pytest.raises(TinyhunError, match=message):
            evaluate.read_jsonl(bad, "choice")
    bad.write_text('{"prompt": "hi", "answer": ""}\n')
    with pytest.raises(TinyhunError, match=r"bad.jsonl:1: 'answer' must be a non-empty string"):
        evaluate.read_jsonl(bad, "generate")
    with pytest.raises(TinyhunError, match="stride=64: expected 1..63"):
        evaluate.perplexity(ours, "some text here", window=64, stride=64)
    with pytest.raises(TinyhunError, match="not found"):
        evaluate.task_path(tmp_path / "missing.txt", "perplexity")


def test_eval_command(capsys):
    assert main(["eval", "choice", "sample", "--model", str(TINY), "--limit", "2", "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["task"] == "choice" and r["items"] == 2 and r["file"].endswith("choice.jsonl")
    assert main(["eval", "perplexity", "sample", "--model", str(TINY), "--limit", "50", "--window", "32",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "over 50 tokens" in out and "tokens/s" in out
    assert main(["eval", "generate", "nope.jsonl", "--model", str(TINY), "--quiet"]) == 2
    assert "nope.jsonl: not found" in capsys.readouterr().err


# ---- lm-evaluation-harness through `tinyhun serve` ----------------------------------------------------------------

LM_TASK = """task: tinyhun_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_local_completions_through_the_server(ours, tmp_path, monkeypatch):
    """EleutherAI's lm-evaluation-harness (lm-eval[api], in the test extra) scores the sample
    choice task through a live server on 127.0.0.1 with its local-completions model (echo + logprobs, tinyhun's
    tokenizer through /tokenizer_info and /tokenize). Every choice's log-likelihood equals what `eval choice`'s
    scorer (evaluate.choice_scores) gives the same token ids, and so do its acc and acc_norm. lm-eval encodes the
    context without special tokens, `eval choice` with them (the tiny tokenizer's BOS): the ids are the same
    otherwise, which the test checks too."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from live_server import LiveServer
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "tinyhun_choice.yaml").write_text(LM_TASK.format(data=evaluate.SAMPLES["choice"]))
    limit, tok = 4, ours.tokenizer
    s = LiveServer(ours, max_context=256, slots=2)
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions", tasks=["tinyhun_choice"], task_manager=TaskManager(include_path=str(tmp_path)),
            model_args=f"model=tiny,base_url={s.url}/v1/completions,num_concurrent=1,max_retries=1", limit=limit,
            log_samples=True)
    finally:
        s.close()
    items = evaluate.read_jsonl(evaluate.SAMPLES["choice"], "choice")[:limit]
    samples = sorted(out["samples"]["tinyhun_choice"], key=lambda smp: smp["doc_id"])
    hits = hits_norm = 0
    for item, smp in zip(items, samples, strict=True):
        ctx = tok.encode(item["context"], add_special_tokens=False)
        conts = [tok.encode(item["context"] + c, add_special_tokens=False)[len(ctx):] for c in item["choices"]]
        assert [tok.bos_id] + ctx == tok.encode(item["context"])                      # eval choice's, less BOS
        assert conts == [tok.encode(c, add_special_tokens=False) for c in item["choices"]]
        want = evaluate.choice_scores(ours, ctx, conts)
        got = [float(r[0]) for r in smp["filtered_resps"]]
        assert np.allclose(got, want, rtol=1e-5, atol=1e-3), (got, want)
        hits += int(np.argmax(want)) == item["answer"]
        hits_norm += int(np.argmax([w / len(c) for w, c in zip(want, item["choices"])])) == item["answer"]
    result = out["results"]["tinyhun_choice"]
    assert (result["acc,none"], result["acc_norm,none"]) == (hits / limit, hits_norm / limit)
