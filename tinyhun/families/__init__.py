"""Model families: config.json's `model_type` -> the module that holds everything specific to it.

Each family module defines `MODEL_TYPE`; `Config` (its fields, read by `Config.from_dict`, and derived values);
`checkpoint_shapes(cfg)` (checkpoint tensor name -> shape, the one table the safetensors and GGUF paths share);
`sanitize(cfg, read)` (checkpoint tensors -> the engine's named weights: renames, splits, stacks happen there and
nowhere else); and `decoder_layer` (the order of its blocks, compiled whole by the Numba backend).

Optional: `GGUF_ARCH`, `GGUF_NAMES`, `GGUF_LAYER_NAMES` (a family that imports GGUF files: tinyhun/gguf_import.py);
`FLOAT_MATRICES` (matrices `tinyhun quantize` keeps fp32); and for the family's vocabularies, which the tokenizer
and the chat recognise by their tokens rather than by config.json: `CHAT_TEMPLATES` ((tokens a vocabulary must
have, a built-in chat template) for folders without one), `END_TOKENS` (tokens that end a reply),
`VOCAB_MARKERS` (control tokens that identify the vocabulary) and `THINK_SWITCH` (the (on, off) prefixes of a
user message that switch thinking, for a template without `enable_thinking`).
"""
from pathlib import Path

from ..config import read_json
from ..errors import TinyhunError
from . import hunyuan_v1_dense, hunyuan_v1_moe, llama

FAMILIES = {m.MODEL_TYPE: m for m in (llama, hunyuan_v1_dense, hunyuan_v1_moe)}


def register(module):
    """Add a family module (one defining what the docstring above lists) under its MODEL_TYPE."""
    FAMILIES[module.MODEL_TYPE] = module
    return module


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


def gguf_family(arch, source="general.architecture"):
    """The family that imports GGUF files of general.architecture `arch` (its GGUF_ARCH)."""
    by_arch = {m.GGUF_ARCH: m for m in FAMILIES.values() if getattr(m, "GGUF_ARCH", None)}
    if arch not in by_arch:
        raise TinyhunError(f"{source} {arch!r} is not supported (supported: {', '.join(by_arch)})")
    return by_arch[arch]


def _each(attr):
    """The items of every family's `attr` tuple, each once, in registry order (families may share them)."""
    return tuple(dict.fromkeys(x for m in FAMILIES.values() for x in getattr(m, attr, ())))


def chat_templates():
    """(tokens a vocabulary must have, template) of every family's built-in chat templates."""
    return _each("CHAT_TEMPLATES")


def end_tokens():
    """Every family's tokens that end a reply."""
    return _each("END_TOKENS")


def vocabulary_family(tokenizer):
    """The first family one of whose VOCAB_MARKERS the tokenizer reads as a single token, or None."""
    for m in FAMILIES.values():
        if any(len(tokenizer.encode(t, add_special_tokens=False)) == 1 for t in getattr(m, "VOCAB_MARKERS", ())):
            return m
    return None
