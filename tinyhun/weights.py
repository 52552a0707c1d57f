"""The one place where checkpoint tensors become the engine's layout.

Checkpoint names and shapes come from the config; every tensor is checked and converted to float32 once (float32
tensors stay memory-mapped).
"""
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .checkpoint import open_folder, to_float32
from .errors import TinyhunError

# present in some exports, never used by the forward pass
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray        # [H]
    wq: np.ndarray               # [nh d, H]
    wk: np.ndarray               # [nkv d, H]
    wv: np.ndarray               # [nkv d, H]
    q_norm: np.ndarray | None    # [d], Hunyuan's per-head QK-norm (None for Llama)
    k_norm: np.ndarray | None    # [d]
    wo: np.ndarray               # [H, nh d]
    mlp_norm: np.ndarray         # [H]
    w_gate: np.ndarray           # [I, H]
    w_up: np.ndarray             # [I, H]
    w_down: np.ndarray           # [H, I]


@dataclass
class Weights:
    embed: np.ndarray            # [V, H]
    layers: list
    norm: np.ndarray             # [H]
    lm_head: np.ndarray          # [V, H]; the embedding itself when tied

    def _layer_arrays(self):
        return [a for layer in self.layers for a in vars(layer).values() if a is not None]

    @property
    def nbytes(self):
        """Bytes of all weights held (a tied lm_head counted once)."""
        head = [] if self.lm_head is self.embed else [self.lm_head]
        return sum(a.nbytes for a in self._layer_arrays() + [self.embed, self.norm] + head)

    @property
    def decode_bytes(self):
        """Bytes read per decoded token: every layer weight and the lm_head (only one embedding row)."""
        return sum(a.nbytes for a in self._layer_arrays() + [self.norm, self.lm_head])


def expected_shapes(cfg):
    """Checkpoint tensor name -> shape, in transformers' naming."""
    H, I, V, d = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (cfg.q_dim, H),
            p + "self_attn.k_proj.weight": (cfg.kv_dim, H),
            p + "self_attn.v_proj.weight": (cfg.kv_dim, H),
            p + "self_attn.o_proj.weight": (H, cfg.q_dim),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        })
        if cfg.qk_norm:
            shapes[p + "self_attn.query_layernorm.weight"] = (d,)
            shapes[p + "self_attn.key_layernorm.weight"] = (d,)
    return shapes


Q4_PARTS = ("qweight", "scales", "mins")   # an INT4 matrix X.weight is stored as X.qweight, X.scales[, X.mins]
Q8_PARTS = ("q8weight", "q8scales")         # an INT8 one (embedding / lm_head) as X.q8weight, X.q8scales


def check_names(files, cfg):
    """Reject tensors the config does not call for; a matrix may be stored as float or as INT4 parts."""
    shapes = expected_shapes(cfg)
    allowed = set(shapes)
    if cfg.quantization:
        allowed |= {n[:-len("weight")] + part for n, shape in shapes.items() if len(shape) == 2
                    for part in Q4_PARTS + Q8_PARTS}
    for name in files:
        harmless = name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings)
        if name not in allowed and not harmless:
            raise TinyhunError(f"{files[name].path}: unexpected tensor '{name}' for this config")
    return shapes


def read_float(files, shapes, folder, name):
    """A float tensor of a checkpoint, checked against the config's shape and converted to float32."""
    if name not in files:
        raise TinyhunError(f"{folder}: missing tensor '{name}'")
    f = files[name]
    got = f.shape(name)
    if got != shapes[name]:
        raise TinyhunError(f"{f.path}: tensor '{name}' has shape {list(got)}, expected {list(shapes[name])}")
    dtype = f.dtype(name)
    if dtype not in ("F32", "F16", "BF16", "F64"):
        raise TinyhunError(f"{f.path}: tensor '{name}' has dtype {dtype}, expected a float type")
    return to_float32(f.get(name), dtype)


def load_weights(folder, cfg, progress=True):
    files = open_folder(folder)
    shapes = check_names(files, cfg)

    def get(name):
        return read_float(files, shapes, folder, name)

    def matrix(name):
        """A weight matrix: float32 [N, K], or a Q4Weight / Q8Weight when the checkpoint stores it quantized."""
        base = name[:-len("weight")]
        if not cfg.quantization or (base + "qweight" not in files and base + "q8weight" not in files):
            return get(name)
        from .kernels import q4, q8
        n, k = shapes[name]
        qname = base + ("qweight" if base + "qweight" in files else "q8weight")
        if base + "qweight" in files:
            kind, parts = q4.Q4Weight, {p: files[base + p].get(base + p) for p in Q4_PARTS if base + p in files}
            meta = {**cfg.quantization, "n": n, "k": k, "sym": "mins" not in parts}
        else:
            kind, parts = q8.Q8Weight, {p: files[base + p].get(base + p) for p in Q8_PARTS if base + p in files}
            meta = {"format": q8.FORMAT, "version": q8.LAYOUT_VERSION, "n": n, "k": k}
        try:
            return kind.from_arrays(parts, meta)
        except TinyhunError as e:
            raise TinyhunError(f"{files[qname].path}: tensor '{base}*': {e}") from None

    layers = []
    for i in tqdm(range(cfg.num_layers), desc="loading", unit="layer", disable=not progress, leave=False):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layers.append(LayerWeights(
            attn_norm=get(p + "input_layernorm.weight"),
            wq=matrix(a + "q_proj.weight"),
            wk=matrix(a + "k_proj.weight"),
            wv=matrix(a + "v_proj.weight"),
            q_norm=get(a + "query_layernorm.weight") if cfg.qk_norm else None,
            k_norm=get(a + "key_layernorm.weight") if cfg.qk_norm else None,
            wo=matrix(a + "o_proj.weight"),
            mlp_norm=get(p + "post_attention_layernorm.weight"),
            w_gate=matrix(p + "mlp.gate_proj.weight"),
            w_up=matrix(p + "mlp.up_proj.weight"),
            w_down=matrix(p + "mlp.down_proj.weight"),
        ))
    embed = matrix("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else matrix("lm_head.weight")
    return Weights(embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head)
