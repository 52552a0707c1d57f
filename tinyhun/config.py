"""Reading config.json: typed, checked fields with one-line errors naming the file. What each field means, and
the values derived from them, belong to the model family (tinyhun/families/<model_type>.py)."""
import json
from pathlib import Path

from .errors import TinyhunError, unreadable


def read_json(path, what="a JSON object"):
    """A JSON object from `path`, or a TinyhunError naming the file."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TinyhunError(f"{path}: not found") from None
    except PermissionError as e:
        raise unreadable(path, e) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyhunError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(d, dict):
        raise TinyhunError(f"{path}: expected {what}")
    return d


class Fields:
    """Typed access to a config dict: `int`, `number` and `flag` check the type and name the field on error."""

    def __init__(self, d, source):
        self.d, self.source = d, source

    def error(self, message):
        return TinyhunError(f"{self.source}: {message}")

    def _get(self, key, default, required):
        v = self.d.get(key, default)
        if v is None and required:
            raise self.error(f"missing required field '{key}'")
        return v

    def int(self, key, default=None, required=True):
        """A positive integer (None when absent and not required)."""
        v = self._get(key, default, required)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v <= 0):
            raise self.error(f"field '{key}'={v!r}: expected a positive integer")
        return None if v is None else int(v)

    def number(self, key, default=None, required=True):
        """A positive number (None when absent and not required)."""
        v = self._get(key, default, required)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise self.error(f"field '{key}'={v!r}: expected a positive number")
        return None if v is None else float(v)

    def flag(self, key, default=False):
        v = self.d.get(key, default)
        if not isinstance(v, bool):
            raise self.error(f"field '{key}'={v!r}: expected true or false")
        return v

    def reject(self, *keys):
        """Options the engine does not implement: refused by name, never silently ignored."""
        for key in keys:
            if self.d.get(key):
                raise self.error(f"'{key}: {json.dumps(self.d[key])}' is not supported")

    def rope(self):
        """(rope type, merged parameters) from transformers 5's `rope_parameters` or the legacy `rope_theta` +
        `rope_scaling`; rope_theta defaults to 10000."""
        params, scaling = self.d.get("rope_parameters") or {}, self.d.get("rope_scaling") or {}
        if not isinstance(params, dict) or not isinstance(scaling, dict):
            raise self.error("rope_parameters/rope_scaling must be JSON objects")
        merged = {"rope_theta": self.d.get("rope_theta", 10000.0), **scaling, **params}
        theta = merged["rope_theta"]
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise self.error(f"rope_theta={theta!r}: expected a positive number")
        return merged.get("rope_type", merged.get("type", "default")), merged


def quantization_block(q, source):
    """The `quantization` block `tinyhun quantize` (or a GGUF import) writes; None for a float checkpoint."""
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("format") != "q4_tiled16" or q.get("version") != 1:
        raise TinyhunError(f"{source}: quantization {q!r} is not supported (expected format 'q4_tiled16' version 1, "
                           "as written by `tinyhun quantize`)")
    if q.get("group") not in (32, 64, 128):
        raise TinyhunError(f"{source}: quantization group {q.get('group')!r}: expected 32, 64 or 128")
    return dict(q)
