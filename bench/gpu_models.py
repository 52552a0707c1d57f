"""The random models and checkpoints bench/gpu_check.py measures and compares (no GPU needed to build them)."""
import json
from pathlib import Path

import numpy as np

from tinyhun.kernels.kv import BLOCK

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(folder, shape, like):
    """A checkpoint folder of `shape` with random weights, the config of weights/`like` otherwise: --tiny's
    stand-in for weights/tiny-hunyuan (or tiny-hunyuan-moe), small enough for the simulator."""
    from tinyhun.families import config_from_dict, family_of
    from tinyhun.folders import write_checkpoint
    names = dict(num_layers="num_hidden_layers", num_heads="num_attention_heads",
                 num_kv_heads="num_key_value_heads")
    d = json.loads((ROOT / "weights" / like / "config.json").read_text())
    d.update({names.get(k, k): v for k, v in shape.items()}, bos_token_id=0, eod_token_id=1, eos_token_id=2,
             pad_token_id=3)
    cfg = config_from_dict(d)
    rng = np.random.default_rng(2)
    tensors = {name: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.2 * rng.standard_normal(s))
               .astype(np.float32) for name, s in family_of(cfg).checkpoint_shapes(cfg).items()}
    Path(folder).mkdir(parents=True)
    write_checkpoint(folder, tensors, d)
    return Path(folder)


def random_model(shape, fmt, backend, max_context, lora_rank=0, kv_dtype="fp16", caches=4):
    """A Hunyuan model of `shape` (dense, or a mixture of experts when it has num_experts) with random weights as
    fp32 (the device makes them fp16) or INT4; lora_rank: with a LoRA adapter of that rank on every linear of every
    layer, kept as a side path. Its KV pool (kv_dtype) holds `caches` caches of max_context tokens."""
    from tinyhun.adapters import TARGETS, Adapter, Update, attach
    from tinyhun.families import hunyuan_v1_dense, hunyuan_v1_moe
    from tinyhun.kernels import q4
    from tinyhun.kernels.linear import as_linear
    from tinyhun.kernels.moe import stack_linears
    from tinyhun.model import Model
    from tinyhun.structs import Attention, DenseMLP, Layer, MoEMLP, Weights
    rng = np.random.default_rng(0)
    moe = "num_experts" in shape
    fam = hunyuan_v1_moe if moe else hunyuan_v1_dense
    L = shape["num_layers"]
    per_layer = {k: (shape[k],) * L for k in ("num_experts", "moe_topk", "moe_intermediate_size",
                                              "num_shared_expert") if moe}
    cfg = fam.Config(model_type=fam.MODEL_TYPE, rms_norm_eps=1e-6, rope_base=1e6,
                     max_position_embeddings=max(4096, max_context), tie_word_embeddings=True,
                     **{**shape, **per_layer})
    H, I, d, nh, nkv = (shape[k] for k in ("hidden_size", "intermediate_size", "head_dim", "num_heads",
                                           "num_kv_heads"))

    made = {}

    def mat(n, k):
        # one random matrix per shape, shared by every layer and expert: speed does not depend on the values, and
        # the device still holds a copy per layer (the backend uploads each), so no layer is read from another's
        # place in the L2 cache. Drawing and quantizing 2.1 G values for the MoE shape would take minutes of the
        # device session
        if (n, k) not in made:
            w = (rng.standard_normal((n, k), np.float32) * 0.02)
            made[n, k] = as_linear(q4.quantize_q4(w, 32) if fmt == "int4" else w)
        return made[n, k]

    def norm(n):
        return np.ones(n, np.float32)

    def mlp():
        dense = DenseMLP(mat(I, H), mat(I, H), mat(H, I))
        if not moe:
            return dense
        E, Ie = shape["num_experts"], shape["moe_intermediate_size"]
        gate, up, down = (stack_linears([mat(n, k) for _ in range(E)]) for n, k in ((Ie, H), (Ie, H), (H, Ie)))
        return MoEMLP(rng.standard_normal((E, H), np.float32), gate, up, down, dense, bool(shape["num_shared_expert"]),
                      shape["moe_topk"], Ie, np.zeros(E, np.int64), np.zeros(1, np.bool_))
    layers = tuple(Layer(norm(H), Attention(mat(nh * d, H), mat(nkv * d, H), mat(nkv * d, H), mat(H, nh * d),
                                            norm(d), norm(d)), norm(H), mlp())
                   for _ in range(L))
    embed = mat(cfg.vocab_size, H)
    weights = Weights(embed, layers, norm(H), embed)
    if lora_rank:
        shapes = {"q_proj": (nh * d, H), "k_proj": (nkv * d, H), "v_proj": (nkv * d, H), "o_proj": (H, nh * d),
                  "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
        ab = {m: (rng.standard_normal((lora_rank, k), np.float32) * 0.02,
                  rng.standard_normal((n, lora_rank), np.float32) * 0.02) for m, (n, k) in shapes.items()}
        weights = attach(weights, cfg, Adapter(None, None, {(i, m): Update(*ab[m], 2.0, m) for i in range(L)
                                                            for m in TARGETS}), "side")
    memory = caches * kv_token_bytes(cfg, kv_dtype) * (max_context + BLOCK)
    return Model(cfg, weights, backend=backend, max_context=max_context, kv_dtype=kv_dtype, kv_memory=memory)


def kv_token_bytes(cfg, kind):
    """Bytes of KV storage per token of context (every layer's keys and values, int8's scales): the pool's."""
    from tinyhun.kv_cache import KVPool
    return KVPool(None, cfg, kind, 1).token_bytes
