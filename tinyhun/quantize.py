"""`tinyhun quantize SRC DST`: a new checkpoint folder whose weight matrices are INT4 (kernels/q4.py's format).

Norms stay float32, and so do the matrices a family names in FLOAT_MATRICES (a mixture of experts' router). The
embedding/lm_head become INT8 by default (`head="q8"`: on SmolLM2 an INT4 head cost about 5 % perplexity, an INT8
one nothing measurable), or INT4 (`head="q4"`, smallest), or stay 16-bit (`head="f16"`).
The config gains a `quantization` block that the loader reads; each INT4 matrix X.weight is stored as X.qweight,
X.scales (and X.mins when asymmetric). The output folder is written atomically (tinyhun/folders.py).
"""
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoint import open_folder
from .errors import TinyhunError
from .families import family_of, read_float_folder
from .folders import atomic_folder, check_destination, write_checkpoint
from .kernels import q4, q8
from .weights import check_names, read_float

HEADS = ("q8", "q4", "f16")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
              "chat_template.jinja", "hy.tiktoken")


def quantization_block(group, sym, head):
    return {"format": q4.FORMAT, "version": q4.LAYOUT_VERSION, "group": group, "sym": sym, "head": head}


def quantize_model(src, dst, group=32, sym=True, head="q8", progress=True, overwrite=False):
    """Write the INT4 copy of model folder `src` into `dst` (a new or empty folder; replaced when overwrite)."""
    src, dst = Path(src), Path(dst)
    if group not in q4.GROUPS:
        raise TinyhunError(f"--group-size {group}: expected one of {', '.join(map(str, q4.GROUPS))}")
    if head not in HEADS:
        raise TinyhunError(f"--head {head!r}: expected one of {', '.join(HEADS)}")
    config, cfg = read_float_folder(src, "")
    check_destination(dst, overwrite, sources=[src])
    files = open_folder(src)
    shapes = check_names(files, cfg)
    keep_float = getattr(family_of(cfg), "FLOAT_MATRICES", ())   # name suffixes of matrices a family keeps fp32

    out = {}
    for name in tqdm(shapes, desc="quantizing", unit="tensor", disable=not progress):
        w = read_float(files, shapes, src, name)
        is_head = name in ("model.embed_tokens.weight", "lm_head.weight")
        if w.ndim == 1 or name.endswith(keep_float):
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
    config["quantization"] = quantization_block(group, sym, head)
    with atomic_folder(dst, overwrite) as tmp:
        write_checkpoint(tmp, out, config)
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return dst
