"""Llama (LlamaForCausalLM, and SmolLM2 through GGUF): pre-norm decoder layers of GQA attention with RoPE and a
SiLU-gated MLP, RMSNorm everywhere, an optionally tied lm_head."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..blocks import attention, mlp
from ..config import Fields, quantization_block
from ..kernels.linear import as_linear
from ..kernels.ref import add, add_rmsnorm, rmsnorm
from ..structs import Attention, DenseMLP, Layer, Weights

MODEL_TYPE = "llama"

# GGUF (llama.cpp's format, tinyhun/gguf_import.py): the general.architecture this family imports, and llama.cpp's
# tensor names -> the checkpoint names of checkpoint_shapes (per-layer ones under blk.N. / model.layers.N.)
GGUF_ARCH = "llama"
GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj",
                    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


@dataclass(frozen=True)
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int           # H
    intermediate_size: int     # I, MLP width
    num_layers: int
    num_heads: int             # nh, query heads
    num_kv_heads: int          # nkv, key/value heads (GQA)
    head_dim: int              # d
    rms_norm_eps: float
    rope_base: float           # effective RoPE base (Hunyuan's alpha already folded in)
    max_position_embeddings: int
    tie_word_embeddings: bool
    quantization: dict | None = None   # {"format", "version", "group", ...} of an INT4 checkpoint (tinyhun quantize)
    rope_alpha: float = 0.0            # Hunyuan's NTK alpha (folded into rope_base already); 0: none
    qk_norm: ClassVar[bool] = False    # per-head RMSNorm of q and k after RoPE

    @property
    def q_dim(self):
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self):
        return self.num_kv_heads * self.head_dim

    @property
    def context_limit(self):
        """The most positions a cache may hold: what the RoPE configuration was trained for."""
        return self.max_position_embeddings

    @property
    def has_experts(self):
        """Whether the layers' MLPs are mixtures of experts (structs.MoEScratch is then sized from the family's
        num_experts, moe_topk and moe_intermediate_size)."""
        return False

    @classmethod
    def from_dict(cls, d, source="config.json"):
        f = Fields(d, source)
        f.reject("attention_bias", "mlp_bias")
        cls.check(f)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise f.error(f"hidden_act {act!r} is not supported (expected 'silu')")
        hidden, heads = f.int("hidden_size"), f.int("num_attention_heads")
        head_dim = f.int("head_dim", required=False) or f.int("attention_head_dim", required=False)
        if head_dim is None:
            if hidden % heads:
                raise f.error(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}; set head_dim")
            head_dim = hidden // heads
        if head_dim % 2:
            raise f.error(f"head_dim {head_dim} must be even for RoPE")
        kv_heads = f.int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise f.error(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        return cls(
            model_type=d["model_type"], vocab_size=f.int("vocab_size"), hidden_size=hidden,
            intermediate_size=f.int("intermediate_size"), num_layers=f.int("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=f.number("rms_norm_eps", default=1e-5), rope_base=cls.rope_base_of(f, head_dim),
            max_position_embeddings=f.int("max_position_embeddings", default=2048),
            # transformers' class default is False for Hunyuan and Llama alike
            tie_word_embeddings=f.flag("tie_word_embeddings", default=False),
            quantization=quantization_block(d.get("quantization"), source), rope_alpha=rope_alpha_of(f))

    @staticmethod
    def check(f):
        """Family-specific options to refuse by name (none beyond the shared ones for Llama)."""

    @staticmethod
    def rope_base_of(f, head_dim):
        kind, p = f.rope()
        if kind != "default":
            raise f.error(f"rope type {kind!r} is not supported (supported: default)")
        return float(p["rope_theta"])


def rope_alpha_of(f):
    kind, p = f.rope()
    return float(p.get("alpha") or 0.0) if kind == "dynamic" else 0.0


def checkpoint_shapes(cfg, layer_extras=None):
    """Checkpoint tensor name -> shape, in transformers' naming (GGUF imports are renamed to it); layer_extras:
    a family's per-layer tensors beyond Llama's (name under model.layers.N -> shape)."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    layer = {"input_layernorm": (H,), "post_attention_layernorm": (H,), "self_attn.q_proj": (cfg.q_dim, H),
             "self_attn.k_proj": (cfg.kv_dim, H), "self_attn.v_proj": (cfg.kv_dim, H),
             "self_attn.o_proj": (H, cfg.q_dim), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H),
             "mlp.down_proj": (H, I), **(layer_extras or {})}
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in layer.items()})
    return shapes


def read_dense_mlp(cfg, read, i, prefix):
    """Layer i's structs.DenseMLP; prefix: its tensors' names up to `mlp.`."""
    return DenseMLP(*(as_linear(read(prefix + n + ".weight")) for n in ("gate_proj", "up_proj", "down_proj")))


def sanitize(cfg, read, norms=None, make_mlp=read_dense_mlp):
    """Checkpoint tensors -> structs.Weights. read(name) gives a checkpoint tensor, checked against
    checkpoint_shapes (a matrix as a float array, Q4Weight or Q8Weight); norms(prefix) the QK-norm weights;
    make_mlp(cfg, read, i, prefix) layer i's MLP block (another family's, a mixture of experts, goes there)."""
    none = np.zeros(0, np.float32)
    none.flags.writeable = False   # the type of a loaded norm (read-only): one compiled rmsnorm for both
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        q_norm, k_norm = norms(a) if norms else (none, none)
        attn = Attention(*(as_linear(read(a + n + ".weight")) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                         q_norm, k_norm)
        layers.append(Layer(read(p + "input_layernorm.weight"), attn, read(p + "post_attention_layernorm.weight"),
                            make_mlp(cfg, read, i, p + "mlp.")))
    embed = as_linear(read("model.embed_tokens.weight"))
    lm_head = embed if cfg.tie_word_embeddings else as_linear(read("lm_head.weight"))
    return Weights(embed, tuple(layers), read("model.norm.weight"), lm_head)


def decoder_layer(lw, s, kv, rows, dims):
    # The block order: h = x + attention(rmsnorm(x)); x' = h + mlp(rmsnorm(h)), on s.x in place.
    # lw: structs.Layer; s: structs.Buffers for T rows; kv: this layer's KV blocks (kernels.kv.KVBlocks)
    rmsnorm(s.xn, s.x, lw.attn_norm, dims.eps)
    attention(s, lw.attn, kv, rows, dims)
    add_rmsnorm(s.xn, s.x, s.proj, lw.mlp_norm, dims.eps)
    mlp(s, lw.mlp)   # the block of the layer's MLP type: dense, or a mixture of experts
    add(s.x, s.x, s.proj)
