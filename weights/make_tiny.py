"""Regenerate the tiny test checkpoint(s) in weights/, bit for bit (fixed seeds), with transformers.

    python weights/make_tiny.py            # writes weights/tiny-hunyuan/, weights/tiny-hunyuan-moe/, weights/tiny-llama/

Also imported by the tests (`build_hunyuan`, `build_hunyuan_moe`, `build_llama`) to make oracle models of other
shapes on the fly.
"""
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import (HunYuanDenseV1Config, HunYuanDenseV1ForCausalLM, HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM,
                          LlamaConfig, LlamaForCausalLM)

SPECIALS = {"bos_token_id": "<｜hy_begin▁of▁sentence｜>", "eos_token_id": "<｜hy_place▁holder▁no▁2｜>",
            "eod_token_id": "<｜hy_end▁of▁sentence｜>", "pad_token_id": "<｜hy_pad｜>"}
HERE = Path(__file__).resolve().parent
TINY = HERE / "tiny-hunyuan"
TINY_MOE = HERE / "tiny-hunyuan-moe"
TINY_LLAMA = HERE / "tiny-llama"


def randomise_norms(model, seed):
    # unit norm weights commute with RoPE's rotation and would hide a wrong RoPE/QK-norm order
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-5)


def build(model_class, config_class, out_dir, seed, kw, adjust=None):
    """A random model of model_class saved to out_dir (fp32 safetensors), its norm weights randomised, then
    adjust(model) applied."""
    torch.manual_seed(seed)
    model = model_class(config_class(**kw)).eval()
    randomise_norms(model, seed)
    if adjust:
        adjust(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def build_hunyuan(out_dir, seed=0, **overrides):
    """A random HunYuanDenseV1 model (tied, alpha RoPE unless overridden); overrides go to the config."""
    kw = dict(SHAPE, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0})
    return build(HunYuanDenseV1ForCausalLM, HunYuanDenseV1Config, out_dir, seed, {**kw, **overrides})


def build_hunyuan_moe(out_dir, seed=0, router_scale=10.0, **overrides):
    """A random HunYuanMoEV1 model (8 experts, top-2 unless overridden), its router weights scaled by router_scale:
    spread-out router logits keep every token's k-th and (k+1)-th expert apart, so fp32 rounding never flips a
    choice between engines."""
    def spread(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.wg.weight"):
                    p.mul_(router_scale)
    kw = dict(SHAPE, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts=8,
              moe_topk=2, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0,
                                           "factor": 1.0})
    return build(HunYuanMoEV1ForCausalLM, HunYuanMoEV1Config, out_dir, seed, {**kw, **overrides}, spread)


def build_llama(out_dir, seed=0, **overrides):
    kw = dict(SHAPE, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    return build(LlamaForCausalLM, LlamaConfig, out_dir, seed, {**kw, **overrides})


def with_tokenizer(out_dir):
    """Write the tiny tokenizer into out_dir; returns the vocab size and the special token ids for the config."""
    sys.path.insert(0, str(HERE))
    from tiny_tokenizer import build as build_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out_dir)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    return vocab, {key: tok.token_to_id(name) for key, name in SPECIALS.items()}


def main(out_dir=TINY, moe_dir=TINY_MOE):
    out_dir = Path(out_dir)
    vocab, ids = with_tokenizer(out_dir)
    build_hunyuan(out_dir, seed=0, vocab_size=vocab, **ids, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                  initializer_range=0.25)   # larger weights than training init: varied, non-degenerate greedy runs
    write_golden(out_dir)
    print(f"wrote {out_dir} (vocab {vocab})")
    main_moe(moe_dir)
    main_llama()


def main_llama(out_dir=TINY_LLAMA):
    """weights/tiny-llama: the Llama family's layer (no QK norm, tied embeddings, as SmolLM2, the default model, has),
    for the Docker image to compile that layer's kernels at build time; the tests build their Llama oracles anew."""
    out_dir = Path(out_dir)
    vocab, ids = with_tokenizer(out_dir)
    ids = {k: v for k, v in ids.items() if k != "eod_token_id"}
    build_llama(out_dir, seed=0, vocab_size=vocab, **ids, tie_word_embeddings=True, initializer_range=0.25)
    print(f"wrote {out_dir} (vocab {vocab})")


def main_moe(out_dir=TINY_MOE):
    """weights/tiny-hunyuan-moe: 8 experts, top-2, one shared MLP, with the same tokenizer."""
    out_dir = Path(out_dir)
    vocab, ids = with_tokenizer(out_dir)
    build_hunyuan_moe(out_dir, seed=0, router_scale=1.0, vocab_size=vocab, **ids, hidden_size=64,
                      intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_experts=8, moe_topk=2, initializer_range=0.25)
    write_golden(out_dir)
    print(f"wrote {out_dir} (vocab {vocab})")


GOLDEN_PROMPTS = [("Hello world", False), ("The quick brown fox", False), ("你好，世界", False),
                  ("What is the capital of France?", True)]


def write_golden(model_dir, steps=32):
    """Greedy token ids of transformers (the oracle) for fixed prompts, with the oracle's versions."""
    import json

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None   # full-length runs: a random model emits stop tokens by chance
    cases = []
    for prompt, chat in GOLDEN_PROMPTS:
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False).input_ids
        else:
            ids = tok(prompt).input_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
        cases.append({"prompt": prompt, "chat": chat, "prompt_ids": ids, "greedy_ids": out[0, len(ids):].tolist()})
    golden = {"oracle": {"transformers": transformers.__version__, "torch": torch.__version__}, "cases": cases}
    lines = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in cases)
    text = f'{{"oracle": {json.dumps(golden["oracle"])},\n "cases": [\n  {lines}\n ]}}\n'
    (Path(model_dir) / "golden.json").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
