"""The model: a family's decoder over prepared weights, run by a backend. Immutable after load, so one Model can
serve many independent KV caches (a server's requests, an evaluator's windows) at once.

`forward(cache, ids)` serves prefill and decode alike: it runs ids at the cache's next positions through every
layer (in chunks of CHUNK rows), appending their keys and values. `forward_batch(caches, tokens)` runs one new
token for each of several caches in a single pass over the weights, each row at its own position.

The caches of a model are block tables over its one KV pool (tinyhun.kv_cache), created on first use: its
memory is held only as tokens arrive, and equal prompt prefixes are stored once.
"""
import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from .adapters import check_base, read_adapter
from .backends import select
from .errors import TinyhunError
from .families import family_of
from .kernels.kv import BLOCK, KINDS
from .kv_cache import KVCache, KVPool
from .structs import Dims

KV_DTYPE = "fp16"   # half the bytes of fp32 for attention to read; fp32 for the oracle tests


def kv_dtype_of(kind):
    """kv_dtype as asked (or TINYHUN_KV_DTYPE, or the default), checked."""
    kind = kind or os.environ.get("TINYHUN_KV_DTYPE") or KV_DTYPE
    if kind not in KINDS:
        raise TinyhunError(f"kv_dtype {kind!r}: expected one of {', '.join(KINDS)} (--kv-dtype, TINYHUN_KV_DTYPE)")
    return kind


def default_kv_memory():
    """Bytes a pool may hold when not told: half the memory available now (it is used only as tokens arrive)."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return 4 << 30

CHUNK = 128   # rows per pass over the weights: a prefill longer than this runs in chunks


def check_ids(ids, vocab_size):
    """ids as int64[T], T >= 1, every id in 0..vocab_size-1; else a TinyhunError saying what was expected."""
    a = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
    if a.ndim != 1 or a.size == 0 or a.dtype.kind not in "iu":
        what = f"{a.dtype} array of shape {list(a.shape)}" if a.dtype != object else "values beyond int64"
        raise TinyhunError(f"token ids: expected a non-empty 1-D sequence of integers, got {what}")
    if int(a.min()) < 0 or int(a.max()) >= vocab_size:
        raise TinyhunError(f"token id out of range [0, {vocab_size}): got {int(a.min())}..{int(a.max())}")
    return a.astype(np.int64, copy=False)


class Model:
    def __init__(self, config, weights, tokenizer=None, backend=None, max_context=None, kv_dtype=None,
                 kv_memory=None, kv_pool=None, kv_salt=b""):
        """kv_pool: another Model's pool to share (an adapter over its base: kv_salt keeps their prefixes apart)."""
        backend = backend or select()
        cfg = config
        set_ = object.__setattr__
        set_(self, "config", cfg)
        set_(self, "family", family_of(cfg))
        set_(self, "backend", backend)
        set_(self, "weights", backend.prepare(weights))
        set_(self, "tokenizer", tokenizer)
        set_(self, "max_context", context_of(cfg, max_context))
        if kv_pool is None:
            memory = (backend.kv_memory() or default_kv_memory()) if kv_memory is None else kv_memory
            if isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0:
                raise TinyhunError(f"kv_memory={kv_memory!r}: expected a positive number of bytes")
            kv_pool = KVPool(backend, cfg, kv_dtype_of(kv_dtype), memory)
        set_(self, "kv_pool", kv_pool)
        set_(self, "kv_salt", kv_salt)
        set_(self, "rope", backend.rope_tables(cfg, self.max_context))
        set_(self, "dims", Dims(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, float(cfg.rms_norm_eps)))
        set_(self, "_layer", backend.layer(self.family))
        set_(self, "_logits", backend.logits())
        set_(self, "_local", threading.local())

    def __setattr__(self, name, value):
        raise AttributeError(f"a Model is immutable after load (tried to set {name!r})")

    # ---- caches ----

    @property
    def kv_dtype(self):
        return self.kv_pool.kind

    def new_caches(self, n, max_context=None):
        """n KV caches (for forward_batch), each holding up to max_context tokens; they take blocks of the
        model's pool as tokens arrive."""
        max_context = max_context or self.max_context
        if isinstance(max_context, bool) or not isinstance(max_context, int) or not 0 < max_context <= self.max_context:
            raise TinyhunError(f"max_context={max_context!r}: expected an integer in 1..{self.max_context} "
                               "(the context this model was loaded with: tinyhun.load(path, max_context=N))")
        return [KVCache(self.kv_pool, max_context, self.kv_salt) for _ in range(n)]

    def new_cache(self, max_context=None):
        return self.new_caches(1, max_context)[0]


    # ---- forward ----

    def _scratch(self):
        s = getattr(self._local, "scratch", None)
        if s is None:
            s = self._local.scratch = self.backend.scratch(self.config, CHUNK, -(-self.max_context // BLOCK))
        return s

    def _run(self, ids, logits_rows, argmax=False):
        """Run len(ids) rows (slots/positions already in the scratch) through every layer; logits_rows: None for
        the last row's logits [1, V], 'all' for every row's (into the scratch), or an out array [T, V]. argmax:
        return each logits row's argmax instead (int64[n]; on a GPU only those ids come down)."""
        sc, w, T = self._scratch(), self.weights, len(ids)
        s = sc.bufs.rows(T)
        rows = sc.rows(T, self.rope, ids)
        pool = self.kv_pool
        kv = pool.layers
        if logits_rows is None:
            n, x, xn, into = 1, s.x[T - 1:T], s.xn[T - 1:T], None
        else:
            n, x, xn = T, s.x, s.xn
            into = None if isinstance(logits_rows, str) else logits_rows
        out = sc.logits_out(n, self.config.vocab_size, into)

        def step():
            # the same arrays each time for the same (pool, T, n): a step the CUDA backend can capture as a graph
            self.backend.embed(s.x, w.embed, rows.ids)
            for li, lw in enumerate(w.layers):
                self._layer(lw, s, kv[li], rows, self.dims)
            self._logits(out, x, w.norm, w.lm_head, xn, s.acts, self.dims.eps)
            if argmax:
                sc.pick(out)
        with self.backend.first_run():
            self.backend.run(sc, (pool, T, n, argmax), step)
        return sc.picked(n) if argmax else sc.to_host(out, into)

    def forward(self, cache, ids, out=None, argmax=False):
        """Append ids at the cache's next positions; return the last token's logits [1, V] (valid until this
        thread's next forward), or write every position's logits into `out` [len(ids), V] and return it.
        argmax=True: return the last token's greedy next token (int, ties to the lowest id) instead of its logits,
        picked where the logits are (on a GPU they stay there)."""
        ids = check_ids(ids, self.config.vocab_size)
        if argmax and out is not None:
            raise TinyhunError("forward: argmax=True returns a token, not logits into `out`")
        start, T = len(cache), len(ids)
        if start + T > cache.max_context:
            raise TinyhunError(f"context full: {start} + {T} tokens exceed max_context {cache.max_context}")
        if out is not None and out.shape != (T, self.config.vocab_size):
            raise TinyhunError(f"forward: out has shape {list(out.shape)}, expected {[T, self.config.vocab_size]}")
        self._own(cache)
        sc = self._scratch()
        for c in range(0, T, CHUNK):
            part = ids[c:c + CHUNK]
            n = len(part)
            cache.reserve(n)
            sc.slots[:n] = 0
            sc.tables[0, :cache.blocks] = cache.table
            sc.positions[:n] = np.arange(start + c, start + c + n)
            logits = self._run(part, None if out is None else out[c:c + n], argmax)
            cache.append(part)
        if argmax:
            return int(logits[0])
        return logits if out is None else out

    def forward_batch(self, caches, tokens, argmax=False):
        """One new token for each cache (distinct caches of this model): logits [len(caches), V], row i for
        caches[i], each token at its own cache's next position. The weights are read once for all of them.
        argmax=True: each row's greedy next token instead (int64[len(caches)], valid until this thread's next
        forward), picked where the logits are."""
        ids = check_ids(tokens, self.config.vocab_size)
        B = len(caches)
        if B != len(ids) or not 0 < B <= CHUNK:
            raise TinyhunError(f"forward_batch: expected one token per cache and 1..{CHUNK} caches, "
                               f"got {len(ids)} tokens for {B} caches")
        if len({id(c) for c in caches}) != B:
            raise TinyhunError("forward_batch: the caches must be distinct")
        for i, c in enumerate(caches):
            self._own(c)
            if len(c) + 1 > c.max_context:
                raise TinyhunError(f"context full: cache {i} holds {len(c)} of {c.max_context} tokens")
        sc = self._scratch()
        for i, c in enumerate(caches):
            c.reserve(1)
            sc.tables[i, :c.blocks] = c.table
        sc.slots[:B] = np.arange(B)
        sc.positions[:B] = [len(c) for c in caches]
        out = self._run(ids, "all", argmax)
        for c, t in zip(caches, ids):
            c.append((t,))
        return out

    def _own(self, cache):
        if cache.pool is not self.kv_pool or cache.salt != self.kv_salt:
            raise TinyhunError("a KV cache of another model (caches come from this model's new_cache/new_caches)")

    def logits(self, ids):
        """float32 [len(ids), V] logits of every position, from a fresh cache."""
        ids = check_ids(ids, self.config.vocab_size)
        if len(ids) > self.max_context:
            raise TinyhunError(f"{len(ids)} tokens exceed the model's context of {self.max_context} "
                               "(tinyhun.load(path, max_context=N) for more)")
        out = np.empty((len(ids), self.config.vocab_size), np.float32)
        return self.forward(self.new_cache(len(ids)), ids, out=out)


def context_of(cfg, asked):
    """The context a model is loaded with: the checkpoint's max_position_embeddings unless asked, at most what
    its RoPE configuration supports (cfg.context_limit)."""
    limit = getattr(cfg, "context_limit", cfg.max_position_embeddings)
    if asked is None:
        return min(cfg.max_position_embeddings, limit)
    if isinstance(asked, bool) or not isinstance(asked, int) or not 0 < asked <= limit:
        raise TinyhunError(f"max_context={asked!r}: expected 1..{limit} (what this model's RoPE configuration "
                           "supports)")
    return asked


def with_adapter(model, adapter_dir, mode=None, base_name=None):
    """A new Model: `model`'s weights with an adapter attached, sharing every base array (an adapter costs only
    its own matrices in side mode, so several can be held over one base and chosen per request)."""
    adapter = read_adapter(adapter_dir)
    weights = model.backend.attach(model.weights, model.config, adapter, mode)
    if base_name:
        check_base(adapter, base_name)
    # one KV pool with the base: an adapter's keys differ from the base's, so its prefixes are hashed apart
    salt = hashlib.blake2b(str(Path(adapter_dir).resolve()).encode(), digest_size=16).digest()
    return Model(model.config, weights, tokenizer=model.tokenizer, backend=model.backend,
                 max_context=model.max_context, kv_pool=model.kv_pool, kv_salt=salt)
