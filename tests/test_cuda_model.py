"""A tiny model through the CUDA backend (Numba's simulator in CI, run by test_cuda_sim.py) equals the CPU path.

Two comparisons, both on the same random weights:
- exact weights: the CPU (NumPy reference backend) runs the very weights the device multiplies by (fp16-rounded
  floats, or the INT4 weights dequantized), so only fp32 summation order differs: max |Δlogit| <= 1e-4 x max |logit|
  (the oracle tests' tolerance);
- as loaded: the CPU runs the fp32 checkpoint weights and the device their fp16 rounding: max |Δlogit| <= 1e-2 x
  max |logit| (fp16's relative rounding is 2^-11 per weight).
"""
import os

import numpy as np
import pytest

from tinyhun.backend import NumpyBackend
from tinyhun.families import hunyuan_v1_dense, llama
from tinyhun.kernels import q4
from tinyhun.kernels.linear import F32, as_linear
from tinyhun.model import Model
from tinyhun.structs import Attention, DenseMLP, Layer, Weights

pytestmark = pytest.mark.skipif(os.environ.get("TINYHUN_CUDA_TESTS") != "1",
                                reason="run by test_cuda_sim.py (simulator subprocess) or bench/gpu_check.py")
f32 = np.float32
V, H, I, L, NH, NKV, D = 32, 32, 32, 2, 2, 1, 16   # tiny: the simulator runs a thread as a Python thread


def config(family):
    return family.Config(model_type=family.MODEL_TYPE, vocab_size=V, hidden_size=H, intermediate_size=I,
                         num_layers=L, num_heads=NH, num_kv_heads=NKV, head_dim=D, rms_norm_eps=1e-5,
                         rope_base=10000.0, max_position_embeddings=32, tie_word_embeddings=True)


def weights(rng, qk_norm, fmt):
    def mat(n, k):
        w = (rng.standard_normal((n, k)) * 0.2).astype(f32)
        return as_linear(q4.quantize_q4(w, 32, fmt == "q4") if fmt.startswith("q4") else w)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(f32)
    none = np.zeros(0, f32)
    layers = tuple(Layer(norm(H), Attention(mat(NH * D, H), mat(NKV * D, H), mat(NKV * D, H), mat(H, NH * D),
                                            norm(D) if qk_norm else none, norm(D) if qk_norm else none),
                         norm(H), DenseMLP(mat(I, H), mat(I, H), mat(H, I)))
                   for _ in range(L))
    embed = mat(V, H)
    return Weights(embed, layers, norm(H), embed)


def as_device_sees(w):
    """The weights as the device multiplies by them, as F32 (fp16-rounded floats, dequantized INT4)."""
    if isinstance(w, F32):
        return F32(w.w.astype(np.float16).astype(f32))
    if hasattr(w, "packed"):
        return F32(q4.dequantize_q4(w.weight()))
    if isinstance(w, tuple):
        parts = [as_device_sees(v) for v in w]
        return type(w)(*parts) if hasattr(w, "_fields") else tuple(parts)
    return w


def run(model):
    """A prefill (GEMMs), a decode step (GEMVs), and a batch step of two caches at different positions."""
    ids = np.array([5, 17, 2, 30, 9, 21])
    a, b = model.new_caches(2, 16)
    out = [model.forward(a, ids[:5]).copy(), model.forward(a, ids[5:]).copy()]
    model.forward(b, ids[:2])
    out.append(model.forward_batch([a, b], np.array([7, 8])).copy())
    return out


def assert_close(got, ref, rel):
    for g, r in zip(got, ref):
        err, bound = float(np.abs(g - r).max()), rel * float(np.abs(r).max())
        assert err <= bound, f"max |Δlogit| {err:.3g} > {bound:.3g} (= {rel} x max |logit|)"


@pytest.mark.parametrize("family, fmt, split", [(hunyuan_v1_dense, "f32", 4), (llama, "q4-asym", None)])
def test_cuda_model_equals_cpu(family, fmt, split, monkeypatch):
    """split=4: caches of 16 positions split attention along the sequence (four splits and their merge)."""
    from tinyhun.cuda_backend import CudaBackend
    from tinyhun.kernels import cuda_attention
    if split:
        monkeypatch.setattr(cuda_attention, "SPLIT", split)
    rng = np.random.default_rng(3)
    cfg = config(family)
    w = weights(rng, family is hunyuan_v1_dense, fmt)
    got = run(Model(cfg, w, backend=CudaBackend(), max_context=16))
    assert_close(got, run(Model(cfg, as_device_sees(w), backend=NumpyBackend(), max_context=16)), 1e-4)
    if fmt == "f32":
        assert_close(got, run(Model(cfg, w, backend=NumpyBackend(), max_context=16)), 1e-2)


def test_launches_per_decoded_token():
    from tinyhun.cuda_backend import CudaBackend
    backend = CudaBackend()
    model = Model(config(llama), weights(np.random.default_rng(5), False, "f32"), backend=backend, max_context=16)
    cache = model.new_cache()
    model.forward(cache, np.array([1]))
    before = backend.launches
    model.forward(cache, np.array([3]))
    assert backend.launches - before == 1 + 6 * L + 1   # embed, six per layer, norm + lm_head
