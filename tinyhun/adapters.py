"""peft LoRA adapters: an adapter folder (adapter_config.json + adapter_model.safetensors), read and checked, put on
a model's weights either merged into float matrices (W + scale * B @ A, once at load) or as a low-rank side path
beside any base linear (kernels/linear.py's LoRA: the base stays INT4, QLoRA-style).

peft names a tensor `base_model.model.<module>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r]; the modules
tinyhun adapts are a decoder layer's seven linears. scale = lora_alpha / r, or lora_alpha / sqrt(r) with
use_rslora; rank_pattern / alpha_pattern override r / alpha per module, matched as peft matches them (the key is
a regex for the module name's tail). Anything else peft can train (embeddings, lm_head, DoRA magnitudes,
modules_to_save, biases) is refused by name rather than silently dropped.
"""
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import SafetensorsFile, to_float32
from .config import read_json
from .errors import TinyhunError
from .kernels.linear import F32, side_path
from .structs import DenseMLP

MODES = ("merge", "side")
# peft module name -> (sublayer field of structs.Layer, linear field in it)
TARGETS = {"q_proj": ("attn", "wq"), "k_proj": ("attn", "wk"), "v_proj": ("attn", "wv"), "o_proj": ("attn", "wo"),
           "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"), "down_proj": ("mlp", "down")}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_MODULE = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<name>\w+)")
# config keys naming peft features tinyhun does not run: a true / non-empty value is refused
UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save", "trainable_token_indices":
               "trainable tokens", "target_parameters": "target_parameters", "lora_bias": "LoRA biases",
               "use_qalora": "QA-LoRA", "layer_replication": "layer replication"}


class AdapterWarning(UserWarning):
    pass


@dataclass(frozen=True)
class Update:
    a: np.ndarray      # float32[r, K] lora_A
    b: np.ndarray      # float32[N, r] lora_B
    scale: float
    where: str         # the tensor name, for errors


@dataclass(frozen=True)
class Adapter:
    path: Path
    base_model: str | None          # base_model_name_or_path, as peft wrote it
    updates: dict                   # (layer index, peft module name) -> Update

    @property
    def name(self):
        return self.path.name


def read_adapter(folder):
    """An Adapter from a peft adapter folder, every field and tensor checked (shapes against the model later)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TinyhunError(f"{folder}: not an adapter folder")
    cfg_path, st_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise TinyhunError(f"{cfg_path}: not found (a peft adapter folder needs an adapter_config.json)")
    if not st_path.is_file():
        if (folder / "adapter_model.bin").exists():
            raise TinyhunError(f"{folder / 'adapter_model.bin'}: a pickle, which tinyhun never loads; save the adapter "
                               "with safe_serialization=True (peft's default) to get adapter_model.safetensors")
        raise TinyhunError(f"{st_path}: not found")
    cfg = read_json(cfg_path, "a JSON object (a peft adapter_config.json)")
    where = str(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise TinyhunError(f"{where}: peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise TinyhunError(f"{where}: {key}={cfg[key]!r}: {what} is not supported (tinyhun runs plain LoRA)")
    if cfg.get("bias", "none") != "none":
        raise TinyhunError(f"{where}: bias={cfg['bias']!r}: trained biases are not supported (expected 'none')")
    if cfg.get("fan_in_fan_out"):
        raise TinyhunError(f"{where}: fan_in_fan_out=true is for Conv1D (GPT-2) layers; these models' linears "
                           "are nn.Linear (expected false)")
    r, alpha = _positive(cfg, "r", where), _positive(cfg, "lora_alpha", where)
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise TinyhunError(f"{where}: use_rslora={rslora!r}, expected true or false")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        p = cfg.get(key) or {}
        if not isinstance(p, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                               for v in p.values()):
            raise TinyhunError(f"{where}: {key} must map module names to positive numbers")
        patterns[key] = p
    _check_targets(cfg.get("target_modules"), where)

    f = SafetensorsFile(st_path)
    found = {}
    for name in f.names:
        m = _TENSOR.fullmatch(name)
        module = m["module"] if m else None
        mm = _MODULE.fullmatch(module) if module else None
        if not mm or mm["name"] not in TARGETS or PARENT[mm["name"]] != mm["parent"]:
            raise TinyhunError(f"{st_path}: tensor '{name}': not a LoRA weight of a supported target module "
                               f"(supported: lora_A/lora_B of {', '.join(TARGETS)} in model.layers.N)")
        dtype = f.dtype(name)
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise TinyhunError(f"{st_path}: tensor '{name}' has dtype {dtype}, expected a float type")
        if len(f.shape(name)) != 2:
            raise TinyhunError(f"{st_path}: tensor '{name}' has shape {list(f.shape(name))}, expected a matrix")
        found.setdefault((int(mm["layer"]), mm["name"], module), {})[m["ab"]] = name

    updates = {}
    for (layer, target, module), ab in sorted(found.items()):
        if len(ab) != 2:
            have = next(iter(ab.values()))
            raise TinyhunError(f"{st_path}: tensor '{have}' has no lora_{'B' if 'A' in ab else 'A'} partner")
        rank = _pattern(patterns["rank_pattern"], module, r)
        scale_alpha = _pattern(patterns["alpha_pattern"], module, alpha)
        a, b = (to_float32(f.get(ab[k]), f.dtype(ab[k])) for k in "AB")
        if a.shape[0] != rank or b.shape[1] != rank:
            raise TinyhunError(f"{st_path}: tensor '{ab['A']}' has shape {list(a.shape)} and '{ab['B']}' "
                               f"{list(b.shape)}, expected rank {rank} ({'rank_pattern' if rank != r else 'r'})")
        scale = scale_alpha / (math.sqrt(rank) if rslora else rank)
        updates[(layer, target)] = Update(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32),
                                          float(scale), f"{st_path}: tensor '{ab['A']}'")
    if not updates:
        raise TinyhunError(f"{st_path}: holds no LoRA weights")
    base = cfg.get("base_model_name_or_path")
    return Adapter(folder, base if isinstance(base, str) and base else None, updates)


def _positive(cfg, key, where):
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (key == "r" and not isinstance(v, int)):
        raise TinyhunError(f"{where}: {key}={v!r}, expected a positive {'integer' if key == 'r' else 'number'}")
    return v


def _check_targets(targets, where):
    # a regex string (peft matches it against full module names) can only be checked through the tensors
    if targets is None or isinstance(targets, str):
        return
    if not isinstance(targets, list):
        raise TinyhunError(f"{where}: target_modules must be a list of module names or a regex string")
    for t in targets:
        if t not in TARGETS:
            raise TinyhunError(f"{where}: target module {t!r} is not supported (supported: {', '.join(TARGETS)})")


def _pattern(patterns, module, default):
    # peft's get_pattern_key: the first key that matches the end of the module name at a dot boundary
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_base(adapter, base_path, config_name=None):
    """Warn (not fail: a base may be a local copy under any name) when the adapter's base_model_name_or_path names
    neither the base folder nor the base's own config name."""
    if adapter.base_model is None:
        return

    def norm(s):
        return re.sub(r"[^a-z0-9]", "", Path(s).name.lower())
    want = norm(adapter.base_model)
    names = [norm(n) for n in (base_path, config_name) if isinstance(n, (str, Path)) and str(n)]
    if want and not any(want in n or (n and n in want) for n in names):
        warnings.warn(AdapterWarning(
            f"{adapter.path / 'adapter_config.json'}: base_model_name_or_path {adapter.base_model!r} does not look "
            f"like the base model {Path(base_path).name!r}; its shapes fit, so it is used anyway"), stacklevel=3)


def check_fit(u, target, shape):
    n, k = shape
    if u.a.shape[1] != k or u.b.shape[0] != n:
        raise TinyhunError(f"{u.where}: lora_A {list(u.a.shape)} / lora_B {list(u.b.shape)} do not fit "
                           f"{target} of shape [{n}, {k}] (expected lora_A [r, {k}], lora_B [{n}, r]); "
                           "is the adapter for another base model?")


def merged(w, u):
    """float32 W + scale * B @ A, as peft's merge computes it in fp32."""
    return np.asarray(w, np.float32) + np.float32(u.scale) * (u.b @ u.a)


def checkpoint_name(layer, target):
    return f"model.layers.{layer}.{PARENT[target]}.{target}.weight"


def attach(weights, cfg, adapter, mode=None):
    """structs.Weights with the adapter's linears replaced: merged into float bases (mode "merge") or as LoRA side
    paths ("side"); mode None: merge when every adapted linear is float, else side (an INT4 base keeps its bits)."""
    if mode not in MODES + (None,):
        raise TinyhunError(f"adapter_mode={mode!r}: expected one of {', '.join(MODES)}")
    layers = list(weights.layers)
    bases = {}
    for (layer, target), u in adapter.updates.items():
        if layer >= len(layers):
            raise TinyhunError(f"{u.where}: layer {layer} does not exist (the base model has {len(layers)} layers)")
        sub, field = TARGETS[target]
        block = getattr(layers[layer], sub)
        if sub == "mlp" and not isinstance(block, DenseMLP):
            raise TinyhunError(f"{u.where}: {target} targets a dense MLP; this model's layer {layer} has "
                               f"{type(block).__name__}")
        base = bases[layer, target] = getattr(block, field)
        check_fit(u, target, base.shape)
    if mode is None:
        mode = "merge" if all(isinstance(b, F32) for b in bases.values()) else "side"
    for (layer, target), u in adapter.updates.items():
        base = bases[layer, target]
        if mode == "merge":
            if not isinstance(base, F32):
                raise TinyhunError(f"{u.where}: cannot merge into {type(base).__name__} weights ({target} of layer "
                                   f"{layer} is quantized); use adapter_mode='side', or merge into the float "
                                   "checkpoint (tinyhun merge) and quantize that")
            new = F32(merged(base.w, u))
        else:
            r = u.a.shape[0]
            if 4 * r > cfg.hidden_size:
                raise TinyhunError(f"{u.where}: rank {r} is too large for the side path of a model with hidden size "
                                   f"{cfg.hidden_size} (at most {cfg.hidden_size // 4}); use adapter_mode='merge'")
            # beside a quantized base A and B are fp16 (half the bytes a token reads; their rounding, 2^-12 of
            # each entry, is far below the base's own); beside a float base they stay float32, exact as peft
            new = side_path(base, u.a, u.b, u.scale, half=not isinstance(base, F32))
        sub, field = TARGETS[target]
        block = getattr(layers[layer], sub)._replace(**{field: new})
        layers[layer] = layers[layer]._replace(**{sub: block})
    return weights._replace(layers=tuple(layers))

