"""Hunyuan dense V1 (Hunyuan-0.5B/1.8B/4B/7B, `hunyuan_v1_dense` in transformers): Llama's blocks in Llama's order,
plus a per-head RMSNorm of q and k applied after RoPE (query_layernorm / key_layernorm, the reverse of Qwen3's
order: blocks.attention applies them when the layer's weights carry them), and RoPE's NTK-alpha base."""
from dataclasses import dataclass
from typing import ClassVar

from . import llama
from .llama import decoder_layer  # noqa: F401  (the same block order)

MODEL_TYPE = "hunyuan_v1_dense"


@dataclass(frozen=True)
class Config(llama.Config):
    qk_norm: ClassVar[bool] = True

    # Tencent's model cards give 256K of context to the NTK-alpha RoPE (alpha 1000) that config.json's 32K
    # max_position_embeddings understates; without alpha the checkpoint's own figure holds
    ALPHA_CONTEXT: ClassVar[int] = 262144

    @property
    def context_limit(self):
        return max(self.max_position_embeddings, self.ALPHA_CONTEXT if self.rope_alpha else 0)

    @staticmethod
    def check(f):
        # cross-layer attention (Hunyuan-Large's use_cla) is not in transformers 5 and not here
        f.reject("use_cla")
        if f.d.get("use_qk_norm") is False:
            raise f.error("'use_qk_norm: false' is not supported for hunyuan_v1_dense")

    @staticmethod
    def rope_base_of(f, head_dim):
        """Hunyuan's "dynamic" type with `alpha` is a static NTK-alpha rescale of the base, theta * alpha^(d/(d-2)),
        independent of sequence length (Tencent's code and transformers 5 both do this)."""
        kind, p = f.rope()
        if kind == "default":
            return float(p["rope_theta"])
        if kind == "dynamic" and p.get("alpha"):
            alpha = p["alpha"]
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
                raise f.error(f"rope alpha={alpha!r}: expected a positive number")
            return float(p["rope_theta"]) * float(alpha) ** (head_dim / (head_dim - 2))
        raise f.error(f"rope type {kind!r} is not supported (supported: default, dynamic with alpha)")


def checkpoint_shapes(cfg):
    d = cfg.head_dim
    return llama.checkpoint_shapes(cfg, {"self_attn.query_layernorm": (d,), "self_attn.key_layernorm": (d,)})


def sanitize(cfg, read, make_mlp=llama.read_dense_mlp):
    return llama.sanitize(cfg, read, make_mlp=make_mlp, norms=lambda a: (read(a + "query_layernorm.weight"),
                                                                         read(a + "key_layernorm.weight")))
