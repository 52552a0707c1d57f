"""Reading safetensors checkpoints: memory-mapped, validated, never pickled.

The `safetensors` package cannot hand NumPy a bf16 tensor (NumPy has no bf16) and its errors do not name the
tensor at fault, so the header is parsed and checked here and the data region is memory-mapped directly.
The format is small: u64 little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian data. As the format requires (and the `safetensors` package enforces), the tensors'
data_offsets must tile the data region exactly: no two tensors share a byte, and no byte belongs to none.
"""
import json
import math
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from .errors import TinyhunError, unreadable

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
          "I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64}
MAX_HEADER = 100 << 20   # the format caps headers at 100 MB


class SafetensorsFile:
    """One .safetensors file: `names`, `metadata`, `dtype(name)`, `shape(name)`, `get(name)` (a read-only memmap
    view)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise TinyhunError(f"{self.path}: truncated (shorter than the 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or n > size - 8:
                    raise TinyhunError(f"{self.path}: corrupt header (claims {n} bytes, file has {size})")
                header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except FileNotFoundError:
            raise TinyhunError(f"{self.path}: not found") from None
        except IsADirectoryError:
            raise TinyhunError(f"{self.path}: is a folder, expected a .safetensors file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TinyhunError(f"{self.path}: corrupt header, not valid JSON ({e})") from None
        except OSError as e:
            raise unreadable(self.path, e) from None
        except _Duplicate as e:
            raise TinyhunError(f"{self.path}: corrupt header, key '{e}' appears twice") from None
        if not isinstance(header, dict):
            raise TinyhunError(f"{self.path}: corrupt header, expected a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise TinyhunError(f"{self.path}: corrupt header, __metadata__ must map names to strings")
        self._start = 8 + n
        data_size = size - self._start
        self._entries = {}
        for name, e in header.items():
            self._entries[name] = self._check(name, e, data_size)
        self._check_tiling(data_size)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if data_size > 0 else np.zeros(0, np.uint8)

    def _check(self, name, e, data_size):
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(e, dict):
            raise TinyhunError(f"{where}: corrupt header entry")
        dtype = e.get("dtype")
        if dtype not in DTYPES:
            raise TinyhunError(f"{where}: unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise TinyhunError(f"{where}: corrupt shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise TinyhunError(f"{where}: corrupt data_offsets {offs!r}")
        begin, end = offs
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise TinyhunError(f"{where}: data_offsets {offs} do not match shape {shape} of {dtype}")
        if end > data_size:
            raise TinyhunError(f"{where}: data_offsets {offs} run past the end of the file "
                               f"({data_size} data bytes; truncated?)")
        return dtype, tuple(shape), begin, end

    def _check_tiling(self, data_size):
        """The tensors' byte ranges, sorted, must follow each other with no overlap and no gap, and end at the
        end of the file (an overlap would let one tensor's bytes be read as another's)."""
        end, last = 0, None
        for name, (_, _, begin, stop) in sorted(self._entries.items(), key=lambda kv: kv[1][2:]):
            if begin < end:
                raise TinyhunError(f"{self.path}: tensor '{name}': data_offsets [{begin}, {stop}] overlap tensor "
                                   f"'{last}' (bytes up to {end}); each byte must belong to one tensor")
            if begin > end:
                raise TinyhunError(f"{self.path}: tensor '{name}': data_offsets [{begin}, {stop}] leave bytes "
                                   f"[{end}, {begin}) of the data region to no tensor (offsets must be contiguous)")
            end, last = stop, name
        if end != data_size:
            raise TinyhunError(f"{self.path}: the tensors cover {end} bytes of the {data_size}-byte data region "
                               "(extra bytes after the last tensor)")

    @property
    def names(self):
        return list(self._entries)

    def dtype(self, name):
        return self._entries[name][0]

    def shape(self, name):
        return self._entries[name][1]

    def get(self, name):
        dtype, shape, begin, end = self._entries[name]
        raw = self._map[self._start + begin:self._start + end]
        return raw.view(DTYPES[dtype]).reshape(shape)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


def to_float32(a, dtype):
    """bf16/f16/f64 -> a new float32 array; float32 is returned as is (still memory-mapped)."""
    if dtype == "BF16":
        # bf16 is the top half of an fp32: widen the bits, no rounding involved
        return (a.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F64"):
        return a.astype(np.float32)
    if dtype == "F32":
        return a
    raise TinyhunError(f"unexpected dtype {dtype} for a float tensor")


def open_folder(folder):
    """The safetensors files of a model folder -> {tensor name: SafetensorsFile}.

    A folder holds either model.safetensors or a sharded model.safetensors.index.json whose weight_map names
    the shards. A shard's name must stay inside the folder (a plain relative path, no `..`); the file itself may be
    a symlink to anywhere, as in a HuggingFace hub cache snapshot (snapshots/<rev>/x -> ../../blobs/<hash>).
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise TinyhunError(f"{index}: not a valid index (expected a JSON object with a 'weight_map')") from None
        shards, where = {}, {}
        for name, rel in weight_map.items():
            if not isinstance(rel, str) or not rel:
                raise TinyhunError(f"{index}: tensor '{name}' maps to {rel!r}, expected a file name")
            parts = PurePosixPath(rel).parts + PureWindowsPath(rel).parts
            if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).anchor or ".." in parts:
                raise TinyhunError(f"{index}: tensor '{name}' points outside the model folder: {rel!r} "
                                   "(expected a file name relative to the folder, without '..')")
            path = folder / PurePosixPath(rel)
            if path not in shards:
                shards[path] = SafetensorsFile(path)
            if name not in shards[path].names:
                raise TinyhunError(f"{path}: tensor '{name}' listed in {index.name} is missing from the file")
            where[name] = shards[path]
        return where
    if single.exists():
        f = SafetensorsFile(single)
        return {name: f for name in f.names}
    raise TinyhunError(f"{folder}: no model.safetensors or model.safetensors.index.json found")
