"""`tinyhun merge BASE ADAPTER OUT`: a float checkpoint folder with a peft LoRA adapter merged into its weights
(W + scale * B @ A), written atomically; a plain model folder from then on, which `tinyhun quantize` takes.

Every tensor is written as float32: a bf16 base's merged matrices would otherwise lose the adapter's small update
to bf16 rounding. A quantized base is refused (merge into its float checkpoint, then quantize).
"""
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import adapters
from .checkpoint import open_folder
from .errors import TinyhunError
from .families import read_float_folder
from .folders import atomic_folder, check_destination, write_checkpoint
from .quantize import SIDE_FILES
from .weights import check_names, read_float


def merge_adapter(base, adapter_dir, dst, progress=True, overwrite=False):
    """Write base + adapter, merged, into dst (a new or empty folder; replaced when overwrite); return dst."""
    base, dst = Path(base), Path(dst)
    config, cfg = read_float_folder(base, "; merge the adapter into the float checkpoint and quantize the result "
                                          "(or run it unmerged: --adapter)")
    adapter = adapters.read_adapter(adapter_dir)
    check_destination(dst, overwrite, sources=[base, adapter.path])
    files = open_folder(base)
    shapes = check_names(files, cfg)
    updates = {}
    for (layer, target), u in adapter.updates.items():
        name = adapters.checkpoint_name(layer, target)
        if name not in shapes:
            raise TinyhunError(f"{u.where}: the base has no {name} ({cfg.num_layers} layers)")
        adapters.check_fit(u, target, shapes[name])
        updates[name] = u
    adapters.check_base(adapter, base.resolve(), config.get("_name_or_path"))

    out = {}
    for name in tqdm(shapes, desc="merging", unit="tensor", disable=not progress):
        w = read_float(files, shapes, base, name)
        out[name] = adapters.merged(w, updates[name]) if name in updates else np.ascontiguousarray(w)
    with atomic_folder(dst, overwrite) as tmp:
        write_checkpoint(tmp, out, {k: v for k, v in config.items() if k != "torch_dtype"} | {"dtype": "float32"})
        for name in SIDE_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
    return dst
