"""Regenerate the tiny test checkpoint(s) in weights/, bit for bit (fixed seeds), with transformers.

    python weights/make_tiny.py            # writes weights/tiny-hunyuan/

Also imported by the tests (`build_hunyuan`, `build_llama`) to make oracle models of other shapes on the fly.
"""
import sys
from pathlib import Path

import torch
from transformers import (HunYuanDenseV1Config, HunYuanDenseV1ForCausalLM, LlamaConfig, LlamaForCausalLM)

HERE = Path(__file__).resolve().parent
TINY = HERE / "tiny-hunyuan"


def randomise_norms(model, seed):
    # unit norm weights commute with RoPE's rotation and would hide a wrong RoPE/QK-norm order
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def build_hunyuan(out_dir, seed=0, **overrides):
    """A random HunYuanDenseV1 model saved to out_dir (fp32 safetensors); overrides go to the config."""
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
              tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0})
    kw.update(overrides)
    torch.manual_seed(seed)
    model = HunYuanDenseV1ForCausalLM(HunYuanDenseV1Config(**kw)).eval()
    randomise_norms(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def build_llama(out_dir, seed=0, **overrides):
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
              tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    randomise_norms(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def main(out_dir=TINY):
    sys.path.insert(0, str(HERE))
    from tiny_tokenizer import build as build_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out_dir)
    build_hunyuan(out_dir, seed=0, vocab_size=vocab, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    print(f"wrote {out_dir} (vocab {vocab})")


if __name__ == "__main__":
    main(*sys.argv[1:])
