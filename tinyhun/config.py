"""Model configuration: one dataclass read from a HuggingFace config.json, derived values computed once here."""
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import TinyhunError

# model_type -> whether attention applies the per-head Q/K RMSNorm (after RoPE, Hunyuan's order)
FAMILIES = {"hunyuan_v1_dense": True, "llama": False}


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
    rope_base: float           # effective RoPE base, alpha already folded in
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool
    quantization: dict | None = None   # {"format", "version", "group", ...} of an INT4 checkpoint (tinyhun quantize)

    @property
    def q_dim(self):
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self):
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_file(cls, path):
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TinyhunError(f"{path}: not found (a model folder needs a config.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TinyhunError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(d, dict):
            raise TinyhunError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_dict(cls, d, source="config.json"):
        def get(key, kind, default=None, required=True):
            v = d.get(key, default)
            if v is None:
                if required:
                    raise TinyhunError(f"{source}: missing required field '{key}'")
                return None
            if kind is bool:
                if not isinstance(v, bool):
                    raise TinyhunError(f"{source}: field '{key}'={v!r}: expected true or false")
                return v
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
                raise TinyhunError(f"{source}: field '{key}'={v!r}: expected {'an integer' if kind is int else 'a number'}")
            if v <= 0:
                raise TinyhunError(f"{source}: field '{key}'={v!r}: expected a positive value")
            return kind(v)

        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise TinyhunError(f"{source}: model_type {model_type!r} is not supported "
                               f"(supported: {', '.join(FAMILIES)})")
        for key in ("use_cla", "attention_bias", "mlp_bias"):
            if d.get(key):
                raise TinyhunError(f"{source}: '{key}: true' is not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise TinyhunError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")
        if model_type == "hunyuan_v1_dense" and d.get("use_qk_norm") is False:
            raise TinyhunError(f"{source}: 'use_qk_norm: false' is not supported for hunyuan_v1_dense")

        hidden = get("hidden_size", int)
        heads = get("num_attention_heads", int)
        head_dim = get("head_dim", int, required=False) or get("attention_head_dim", int, required=False)
        if head_dim is None:
            if hidden % heads:
                raise TinyhunError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                                   "set head_dim")
            head_dim = hidden // heads
        if head_dim % 2:
            raise TinyhunError(f"{source}: head_dim {head_dim} must be even for RoPE")
        kv_heads = get("num_key_value_heads", int, default=heads)
        if heads % kv_heads:
            raise TinyhunError(f"{source}: num_attention_heads {heads} is not a multiple of "
                               f"num_key_value_heads {kv_heads}")
        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_layers=get("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=get("rms_norm_eps", float, default=1e-5),
            rope_base=rope_base(d, head_dim, source),
            max_position_embeddings=get("max_position_embeddings", int, default=2048),
            # transformers' class default is False for Hunyuan and Llama alike
            tie_word_embeddings=get("tie_word_embeddings", bool, default=False),
            qk_norm=FAMILIES[model_type],
            quantization=quantization_block(d.get("quantization"), source),
        )


def rope_base(d, head_dim, source):
    """Effective RoPE base from transformers 5's `rope_parameters` or the legacy `rope_theta` + `rope_scaling`.

    Hunyuan's "dynamic" type with `alpha` is a static NTK-alpha rescale of the base, theta * alpha^(d/(d-2)),
    independent of sequence length (Tencent's code and transformers 5 both do this).
    """
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise TinyhunError(f"{source}: rope_parameters/rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise TinyhunError(f"{source}: rope_theta={theta!r}: expected a positive number")
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return float(theta)
    if kind == "dynamic" and merged.get("alpha"):
        alpha = merged["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise TinyhunError(f"{source}: rope alpha={alpha!r}: expected a positive number")
        return float(theta) * float(alpha) ** (head_dim / (head_dim - 2))
    raise TinyhunError(f"{source}: rope type {kind!r} is not supported "
                       "(supported: default, dynamic with alpha)")


def quantization_block(q, source):
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("format") != "q4_tiled16" or q.get("version") != 1:
        raise TinyhunError(f"{source}: quantization {q!r} is not supported (expected format 'q4_tiled16' version 1, "
                           "as written by `tinyhun quantize`)")
    if q.get("group") not in (32, 64, 128):
        raise TinyhunError(f"{source}: quantization group {q.get('group')!r}: expected 32, 64 or 128")
    return dict(q)
