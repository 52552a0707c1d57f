"""Prompt cache files (`tinyhun cache-prompt`, `--prompt-cache`): a long prompt prefilled once, its token ids and
KV blocks written with safetensors, read back into a model's pool where every prompt that starts with those
tokens finds them (the pool's prefix sharing, tinyhun.kv_cache).

The file holds `tokens` int64[n] and, for each field of kernels.kv.KVBlocks, the prompt's blocks of every layer
[L, blocks, ...]; its metadata names the model (a fingerprint of its config and weights), the KV storage type and
block size, and a blake2b digest of every byte of the tensors, so a file of another model or kv_dtype is refused
by name and an altered or truncated one is refused whole, before any block is written.
"""
import hashlib
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .errors import TinyhunError
from .kernels.kv import BLOCK

FORMAT = "tinyhun-prompt-cache/1"
FIELDS = ("k", "v", "k_scale", "v_scale")


def fingerprint(model):
    """A model's identity for its KV cache: config and a few weight arrays (two checkpoints of one shape differ)."""
    h = hashlib.blake2b(repr(model.config).encode(), digest_size=16)
    w = model.weights
    for a in (w.norm, w.layers[0].attn_norm, w.layers[-1].mlp_norm):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(model.kv_salt)
    return h.hexdigest()


def _digest(tensors):
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(model, cache, path, name=None):
    """Write the tokens `cache` holds and their KV blocks to `path` (atomically: a temp file, then a rename)."""
    n = len(cache)
    if n == 0:
        raise TinyhunError("cache-prompt: the prompt is empty")
    blocks = cache.table[:-(-n // BLOCK)]
    tensors = {"tokens": np.asarray(cache.tokens, np.int64)}
    for field, arrays in zip(FIELDS, model.backend.read_blocks(model.kv_pool.layers, blocks)):
        if arrays.size:
            tensors[field] = arrays
    meta = {"format": FORMAT, "model": fingerprint(model), "model_name": name or "", "kv_dtype": model.kv_dtype,
            "block": str(BLOCK), "digest": _digest(tensors)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load(model, path):
    """A KVCache of `model` holding the file's tokens, its blocks registered for sharing; a TinyhunError naming
    what is wrong for a file that is not a whole prompt cache of this model and kv_dtype."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise TinyhunError(f"{path}: not a readable prompt cache ({e})") from None
    if meta.get("format") != FORMAT:
        raise TinyhunError(f"{path}: not a tinyhun prompt cache (format {meta.get('format')!r}, expected {FORMAT})")
    if meta.get("digest") != _digest(tensors):
        raise TinyhunError(f"{path}: its contents do not match their digest (altered or damaged); write it again")
    if meta.get("model") != fingerprint(model):
        raise TinyhunError(f"{path}: written for another model ({meta.get('model_name') or 'unnamed'}, "
                           f"{meta.get('model')}) than this one ({fingerprint(model)})")
    if meta.get("kv_dtype") != model.kv_dtype or meta.get("block") != str(BLOCK):
        raise TinyhunError(f"{path}: written with kv_dtype {meta.get('kv_dtype')} (blocks of {meta.get('block')}), "
                           f"this model runs kv_dtype {model.kv_dtype} (blocks of {BLOCK}); pass --kv-dtype "
                           f"{meta.get('kv_dtype')} or write the cache again")
    tokens = tensors.get("tokens")
    nb = -(-len(tokens) // BLOCK) if tokens is not None and tokens.ndim == 1 else -1
    fields = [tensors.get(f, np.zeros(0, np.float32)) for f in FIELDS]
    if nb < 1 or any(a.size and (a.ndim < 2 or a.shape[:2] != (model.config.num_layers, nb)) for a in fields[:2]):
        raise TinyhunError(f"{path}: its tokens and blocks do not agree")
    cache = model.new_cache()
    if len(tokens) > cache.max_context:
        raise TinyhunError(f"{path}: {len(tokens)} tokens exceed this model's context of {cache.max_context}")
    cache.reserve(len(tokens))
    model.backend.write_blocks(model.kv_pool.layers, cache.table[:nb], fields)
    cache.append(tokens)
    return cache


def system_prefix(tokenizer, system):
    """The tokens every chat with this system prompt starts with: the common prefix of two conversations'
    renderings (the template's text for the system message, as a conversation tokenizes it)."""
    a, b = (tokenizer.encode(tokenizer.render_chat([{"role": "system", "content": system},
                                                    {"role": "user", "content": u}]), add_special_tokens=False)
            for u in ("a", "b"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]

