"""Model families: config.json's `model_type` -> the module that holds everything specific to it.

Each family module defines `MODEL_TYPE`; `Config` (its fields, read by `Config.from_dict`, and derived values);
`checkpoint_shapes(cfg)` (checkpoint tensor name -> shape, the one table the safetensors and GGUF paths share);
`sanitize(cfg, read)` (checkpoint tensors -> the engine's named weights: renames, splits, stacks happen there and
nowhere else); and `decoder_layer` (the order of its blocks, compiled whole by the Numba backend).
"""
from pathlib import Path

from ..config import read_json
from ..errors import TinyhunError
from . import hunyuan_v1_dense, hunyuan_v1_moe, llama

FAMILIES = {m.MODEL_TYPE: m for m in (llama, hunyuan_v1_dense, hunyuan_v1_moe)}


def family(model_type, source="config.json"):
    if model_type not in FAMILIES:
        raise TinyhunError(f"{source}: model_type {model_type!r} is not supported "
                           f"(supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def config_from_dict(d, source="config.json"):
    """The family's Config for a config.json dict."""
    return family(d.get("model_type"), source).Config.from_dict(d, source)


def load_config(path):
    """The family's Config for a config.json file."""
    path = Path(path)
    return config_from_dict(read_json(path, "a JSON object (a model's config.json)"), str(path))


def read_float_folder(folder, refusal):
    """(config.json as a dict, its Config) of a model folder whose weights are float, as `tinyhun quantize` and
    `tinyhun merge` need; a quantized one is refused with `refusal` (what to do instead)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TinyhunError(f"{folder}: not a model folder")
    path = folder / "config.json"
    d = read_json(path, "a JSON object (a model's config.json)")
    cfg = config_from_dict(d, str(path))
    if cfg.quantization:
        raise TinyhunError(f"{path}: already quantized ({cfg.quantization['format']}){refusal}")
    return d, cfg


def family_of(cfg):
    return FAMILIES[cfg.model_type]
