"""`tinyhun quantize SRC DST`: a new checkpoint folder whose weight matrices are INT4 (kernels/q4.py's format).

Norms stay float32. The embedding/lm_head become INT8 by default (`head="q8"`: on SmolLM2 an INT4 head cost about
5 % perplexity, an INT8 one nothing measurable), or INT4 (`head="q4"`, smallest), or stay 16-bit (`head="f16"`).
The config gains a `quantization` block that the loader reads; each INT4 matrix X.weight is stored as X.qweight,
X.scales (and X.mins when asymmetric). The output is written into a temporary folder and renamed into place.
"""
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from .checkpoint import open_folder
from .config import Config
from .errors import TinyhunError
from .kernels import q4, q8
from .weights import check_names, read_float

HEADS = ("q8", "q4", "f16")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
              "chat_template.jinja", "hy.tiktoken")


def quantization_block(group, sym, head):
    return {"format": q4.FORMAT, "version": q4.LAYOUT_VERSION, "group": group, "sym": sym, "head": head}


def quantize_model(src, dst, group=32, sym=True, head="q8", progress=True):
    src, dst = Path(src), Path(dst)
    if group not in q4.GROUPS:
        raise TinyhunError(f"--group-size {group}: expected one of {', '.join(map(str, q4.GROUPS))}")
    if head not in HEADS:
        raise TinyhunError(f"--head {head!r}: expected one of {', '.join(HEADS)}")
    cfg_path = src / "config.json"
    cfg = Config.from_file(cfg_path)
    if cfg.quantization:
        raise TinyhunError(f"{cfg_path}: already quantized ({cfg.quantization['format']})")
    if dst.exists() and (dst.resolve() == src.resolve() or any(dst.iterdir())):
        raise TinyhunError(f"{dst}: exists and is not empty; choose a new output folder (the source is never "
                           "overwritten)")
    files = open_folder(src)
    shapes = check_names(files, cfg)

    out = {}
    for name in tqdm(shapes, desc="quantizing", unit="tensor", disable=not progress):
        w = read_float(files, shapes, src, name)
        is_head = name in ("model.embed_tokens.weight", "lm_head.weight")
        if w.ndim == 1:
            out[name] = np.ascontiguousarray(w)
        elif is_head and head == "f16":
            out[name] = w.astype(np.float16)
        elif is_head and head == "q8":
            for part, a in q8.quantize_q8(w).to_arrays().items():
                out[name[:-len("weight")] + part] = a
        else:
            if w.shape[1] % group:
                raise TinyhunError(f"{files[name].path}: tensor '{name}' has {w.shape[1]} columns, "
                                   f"not a multiple of --group-size {group}")
            base = name[:-len("weight")]
            for part, a in q4.quantize_q4(w, group=group, sym=sym).to_arrays().items():
                out[base + part] = a
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    config["quantization"] = quantization_block(group, sym, head)
    write_folder(dst, out, config, src)
    return dst


def write_folder(dst, tensors, config, side_files_from=None):
    """Write config.json + model.safetensors (+ tokenizer files) into dst atomically: a temp folder, then rename."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # the config's quantization block is repeated in the file's own metadata, so the file names its format
        meta = {"format": "pt", "quantization": json.dumps(config.get("quantization"))}
        save_file(tensors, str(tmp / "model.safetensors"), metadata=meta)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in SIDE_FILES if side_files_from else ():
            if (Path(side_files_from) / name).exists():
                shutil.copy2(Path(side_files_from) / name, tmp / name)
        if dst.exists():
            dst.rmdir()   # empty, checked by the caller
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst

