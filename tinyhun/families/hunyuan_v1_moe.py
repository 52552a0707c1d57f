"""Hunyuan MoE V1 (Hunyuan-A13B and relatives, `hunyuan_v1_moe` in transformers): the dense family's attention and
block order, with each layer's MLP a mixture of experts (structs.MoEMLP, run by blocks.moe_mlp).

Routing as transformers 5 does it (kernels/moe.py says where public ports differ): an fp32 router, softmax over all
experts, the top k renormalised to sum 1, no capacity limit; one shared MLP of width intermediate_size added with
weight 1. Widths: transformers builds every expert `intermediate_size` wide and reads no `moe_intermediate_size`;
Tencent's configs carry `moe_intermediate_size` (the experts' width) and `num_shared_expert`. Both are read here
when present, per layer or not, and the checkpoint's tensors are checked against them.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import Fields
from ..kernels.linear import F32, as_linear
from ..kernels.moe import stack_linears
from ..structs import DenseMLP, MoEMLP
from . import hunyuan_v1_dense
from .llama import read_dense_mlp

MODEL_TYPE = "hunyuan_v1_moe"
# Hunyuan-A13B speaks the dense family's tiktoken vocabulary
CHAT_TEMPLATES, END_TOKENS = hunyuan_v1_dense.CHAT_TEMPLATES, hunyuan_v1_dense.END_TOKENS
VOCAB_MARKERS, THINK_SWITCH = hunyuan_v1_dense.VOCAB_MARKERS, hunyuan_v1_dense.THINK_SWITCH
FLOAT_MATRICES = ("mlp.gate.wg.weight",)   # the router stays fp32 in a quantized checkpoint, as transformers keeps it


@dataclass(frozen=True)
class Config(hunyuan_v1_dense.Config):
    num_experts: tuple = ()             # E of each layer
    moe_topk: tuple = ()                # k of each layer
    moe_intermediate_size: tuple = ()   # Ie of each layer
    num_shared_expert: tuple = ()       # shared MLPs of each layer: 0 or 1 (width intermediate_size)

    @property
    def has_experts(self):
        return bool(self.num_experts)

    @staticmethod
    def check(f):
        hunyuan_v1_dense.Config.check(f)
        f.reject("moe_layer_num_skipped")   # Tencent's dense first layers: transformers has none

    @classmethod
    def from_dict(cls, d, source="config.json"):
        cfg = super().from_dict(d, source)
        f, L = Fields(d, source), cfg.num_layers

        def per_layer(keys, default, least=1):
            key = next((k for k in keys if d.get(k) is not None), keys[0])
            v = d.get(key, default)
            values = v if isinstance(v, list) else [v] * L
            if len(values) != L or any(isinstance(x, bool) or not isinstance(x, int) or x < least for x in values):
                raise f.error(f"field '{key}'={v!r}: expected an integer >= {least} or a list of {L} of them "
                              "(one per layer)")
            return tuple(values)
        experts = per_layer(("num_experts", "num_local_experts"), None)
        topk = per_layer(("moe_topk", "num_experts_per_tok"), 1)
        width = per_layer(("moe_intermediate_size",), cfg.intermediate_size)
        # Tencent's use_mixed_mlp_moe=false: no shared MLP; transformers always builds one
        shared = per_layer(("num_shared_expert",), 0 if d.get("use_mixed_mlp_moe") is False else 1, least=0)
        for i, (e, k, n) in enumerate(zip(experts, topk, shared)):
            if k > e:
                raise f.error(f"layer {i}: moe_topk {k} exceeds num_experts {e}")
            if n > 1:
                raise f.error(f"layer {i}: num_shared_expert {n} is not supported (expected 0 or 1)")
        return dataclasses.replace(cfg, num_experts=experts, moe_topk=topk, moe_intermediate_size=width,
                                   num_shared_expert=shared)


decoder_layer = hunyuan_v1_dense.decoder_layer   # the same block order; blocks.mlp picks the MoE block


def checkpoint_shapes(cfg):
    H, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {n: s for n, s in hunyuan_v1_dense.checkpoint_shapes(cfg).items() if ".mlp." not in n}
    for i in range(cfg.num_layers):
        p, Ie = f"model.layers.{i}.mlp.", cfg.moe_intermediate_size[i]
        shapes[p + "gate.wg.weight"] = (cfg.num_experts[i], H)
        for e in range(cfg.num_experts[i]):
            q = f"{p}experts.{e}."
            shapes.update({q + "gate_proj.weight": (Ie, H), q + "up_proj.weight": (Ie, H),
                           q + "down_proj.weight": (H, Ie)})
        if cfg.num_shared_expert[i]:
            q = p + "shared_mlp."
            shapes.update({q + "gate_proj.weight": (I, H), q + "up_proj.weight": (I, H),
                           q + "down_proj.weight": (H, I)})
    return shapes


def sanitize(cfg, read):
    counting = np.zeros(1, np.bool_)   # one switch for the model's routing statistics (tinyhun.moe_stats)
    no_shared = DenseMLP(*(F32(np.zeros((0, cfg.hidden_size), np.float32)),) * 3)

    def moe_mlp(cfg, read, i, prefix):
        E = cfg.num_experts[i]
        experts = [prefix + f"experts.{e}." for e in range(E)]
        gate, up, down = (stack_linears([as_linear(read(x + n + ".weight")) for x in experts])
                          for n in ("gate_proj", "up_proj", "down_proj"))
        has_shared = bool(cfg.num_shared_expert[i])
        shared = read_dense_mlp(cfg, read, i, prefix + "shared_mlp.") if has_shared else no_shared
        return MoEMLP(read(prefix + "gate.wg.weight"), gate, up, down, shared, has_shared, cfg.moe_topk[i],
                      cfg.moe_intermediate_size[i], np.zeros(E, np.int64), counting)
    return hunyuan_v1_dense.sanitize(cfg, read, make_mlp=moe_mlp)
