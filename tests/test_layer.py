"""A family's decoder layer: the same function run as Python over the NumPy references and compiled whole by
Numba, on named weights of every linear format, prefill then decode through the cache."""
from types import SimpleNamespace

import numpy as np
import pytest

from tinyhun.backends import NumbaBackend
from tinyhun.families import hunyuan_v1_dense, llama
from tinyhun.kernels import q4, q8
from tinyhun.kernels.linear import as_linear
from tinyhun.kernels.kv import KVBlocks
from tinyhun.structs import Attention, Buffers, DenseMLP, Dims, Layer, Rows

f32 = np.float32
FORMATS = {"f32": lambda w: w, "q4": lambda w: q4.quantize_q4(w, 32), "q4-asym": lambda w: q4.quantize_q4(w, 32, False),
           "q8": q8.quantize_q8}


def make_layer(rng, H, nh, nkv, d, inter, qk_norm, fmt):
    def mat(n, k):
        return as_linear(FORMATS[fmt]((rng.standard_normal((n, k)) * 0.15).astype(f32)))

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(f32)
    none = np.zeros(0, f32)
    attn = Attention(mat(nh * d, H), mat(nkv * d, H), mat(nkv * d, H), mat(H, nh * d),
                     norm(d) if qk_norm else none, norm(d) if qk_norm else none)
    return Layer(norm(H), attn, norm(H), DenseMLP(mat(inter, H), mat(inter, H), mat(H, inter)))


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_compiled_layer_equals_reference(qk_norm, fmt):
    rng = np.random.default_rng(int(qk_norm))
    H, nh, nkv, d, inter, S = 64, 4, 2, 16, 96, 12
    lw = make_layer(rng, H, nh, nkv, d, inter, qk_norm, fmt)
    cfg = SimpleNamespace(hidden_size=H, intermediate_size=inter, q_dim=nh * d, kv_dim=nkv * d,
                          has_experts=False)
    dims = Dims(nh, nkv, d, 1e-6)
    family = hunyuan_v1_dense if qk_norm else llama
    runs = {"ref": family.decoder_layer, "numba": NumbaBackend().layer(family)}
    # a paged fp32 KV cache of one sequence: blocks of 4 positions, its table in reverse order
    bs, nb = 4, -(-S // 4)
    tables = np.arange(nb, dtype=np.int32)[::-1].copy()[None]
    caches = {m: KVBlocks(np.zeros((nb, nkv, bs, d), f32), np.zeros((nb, nkv, bs, d), f32),
                          np.zeros((0, 0, 0), f32), np.zeros((0, 0, 0), f32)) for m in runs}
    x0 = rng.standard_normal((S, H)).astype(f32)
    inv = 10000.0 ** (-np.arange(0, d, 2) / d)
    for pos, T in ((0, 7), (7, 1), (8, 1)):
        positions = np.arange(pos, pos + T)
        ang = np.outer(positions, inv)
        rows = Rows(np.zeros(T, np.int64), positions, np.cos(ang).astype(f32), np.sin(ang).astype(f32),
                    np.zeros(T, np.int64), tables)
        outs = {}
        for m, layer in runs.items():
            s = Buffers.allocate(cfg, T)
            s.x[:] = x0[pos:pos + T]
            layer(lw, s, caches[m], rows, dims)
            outs[m] = s.x
        rtol = 1e-5 if fmt == "f32" else 1e-4   # int8 activations: a rounding flip moves a value by one step
        scale = np.abs(outs["ref"]).max()
        assert np.abs(outs["numba"] - outs["ref"]).max() <= rtol * scale
        assert np.abs(caches["numba"].k - caches["ref"].k).max() <= rtol * np.abs(caches["ref"].k).max()
