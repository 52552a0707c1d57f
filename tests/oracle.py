"""Helpers for oracle tests: build tiny random transformers models and get their fp32 logits."""
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "weights"))

from make_tiny import build_hunyuan, build_hunyuan_moe, build_llama  # noqa: E402

__all__ = ["build_hunyuan", "build_hunyuan_moe", "build_llama", "oracle_logits", "assert_logits_close", "ROOT"]


def oracle_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))[None]).logits[0].float().numpy()


def assert_logits_close(got, ref, rel=1e-4):
    """max |Δlogit| <= rel * max |logit|, the tolerance the oracle tests state."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = float(np.abs(got - ref).max())
    bound = rel * float(np.abs(ref).max())
    assert err <= bound, f"max |Δlogit| {err:.3g} > {bound:.3g} (= {rel} x max |logit|)"
    return err
