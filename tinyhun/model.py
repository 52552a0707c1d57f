"""The model: a family's decoder over prepared weights, run by a backend. Immutable after load, so one Model can
serve many independent KV caches (a server's requests, an evaluator's windows) at once.

`forward(cache, ids)` serves prefill and decode alike: it runs ids at the cache's next positions through every
layer (in chunks of CHUNK rows), appending their keys and values. `forward_batch(caches, tokens)` runs one new
token for each of several caches of one pool in a single pass over the weights, each row at its own position.
"""
import threading

import numpy as np

from .errors import TinyhunError
from .families import family_of
from .kv_cache import KVPool
from .structs import Dims

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
    def __init__(self, config, weights, tokenizer=None, backend=None, max_context=None):
        from .backend import select
        backend = backend or select()
        cfg = config
        set_ = object.__setattr__
        set_(self, "config", cfg)
        set_(self, "family", family_of(cfg))
        set_(self, "backend", backend)
        set_(self, "weights", backend.prepare(weights))
        set_(self, "tokenizer", tokenizer)
        set_(self, "max_context", max_context or min(cfg.max_position_embeddings, 4096))
        cos, sin = backend.rope_tables(cfg, self.max_context)
        set_(self, "rope", (cos, sin))
        set_(self, "dims", Dims(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, float(cfg.rms_norm_eps)))
        set_(self, "_layer", backend.layer(self.family))
        set_(self, "_logits", backend.logits())
        set_(self, "_local", threading.local())

    def __setattr__(self, name, value):
        raise AttributeError(f"a Model is immutable after load (tried to set {name!r})")

    # ---- caches ----

    def new_caches(self, n, max_context=None):
        """n KV caches in one pool (for forward_batch), each holding up to max_context tokens."""
        max_context = max_context or self.max_context
        if isinstance(max_context, bool) or not isinstance(max_context, int) or not 0 < max_context <= self.max_context:
            raise TinyhunError(f"max_context={max_context!r}: expected an integer in 1..{self.max_context} "
                               "(the context this model was loaded with: tinyhun.load(path, max_context=N))")
        return KVPool(self.backend, self.config, n, max_context).caches()

    def new_cache(self, max_context=None):
        return self.new_caches(1, max_context)[0]


    # ---- forward ----

    def _scratch(self):
        s = getattr(self._local, "scratch", None)
        if s is None:
            s = self._local.scratch = self.backend.scratch(self.config, CHUNK)
        return s

    def _run(self, pool, ids, logits_rows, argmax=False):
        """Run len(ids) rows (slots/positions already in the scratch) through every layer; logits_rows: None for
        the last row's logits [1, V], 'all' for every row's (into the scratch), or an out array [T, V]. argmax:
        return each logits row's argmax instead (int64[n]; on a GPU only those ids come down)."""
        sc, w, T = self._scratch(), self.weights, len(ids)
        s = sc.bufs.rows(T)
        rows = sc.rows(T, self.rope, ids)
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
                self._layer(lw, s, pool.k[li], pool.v[li], rows, self.dims)
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
        sc = self._scratch()
        for c in range(0, T, CHUNK):
            part = ids[c:c + CHUNK]
            n = len(part)
            sc.slots[:n] = cache.slot
            sc.positions[:n] = np.arange(start + c, start + c + n)
            logits = self._run(cache.pool, part, None if out is None else out[c:c + n], argmax)
            cache.append(part)
        if argmax:
            return int(logits[0])
        return logits if out is None else out

    def forward_batch(self, caches, tokens, argmax=False):
        """One new token for each cache (caches of one pool, from new_caches): logits [len(caches), V], row i for
        caches[i], each token at its own cache's next position. The weights are read once for all of them.
        argmax=True: each row's greedy next token instead (int64[len(caches)], valid until this thread's next
        forward), picked where the logits are."""
        ids = check_ids(tokens, self.config.vocab_size)
        B = len(caches)
        if B != len(ids) or not 0 < B <= CHUNK:
            raise TinyhunError(f"forward_batch: expected one token per cache and 1..{CHUNK} caches, "
                               f"got {len(ids)} tokens for {B} caches")
        pool = caches[0].pool
        if any(c.pool is not pool for c in caches) or len({c.slot for c in caches}) != B:
            raise TinyhunError("forward_batch: the caches must be distinct caches of one pool (Model.new_caches)")
        for c in caches:
            if len(c) + 1 > c.max_context:
                raise TinyhunError(f"context full: cache {c.slot} holds {len(c)} of {c.max_context} tokens")
        sc = self._scratch()
        sc.slots[:B] = [c.slot for c in caches]
        sc.positions[:B] = [len(c) for c in caches]
        out = self._run(pool, ids, "all", argmax)
        for c, t in zip(caches, ids):
            c.append((t,))
        return out

    def logits(self, ids):
        """float32 [len(ids), V] logits of every position, from a fresh cache."""
        ids = check_ids(ids, self.config.vocab_size)
        if len(ids) > self.max_context:
            raise TinyhunError(f"{len(ids)} tokens exceed the model's context of {self.max_context} "
                               "(tinyhun.load(path, max_context=N) for more)")
        out = np.empty((len(ids), self.config.vocab_size), np.float32)
        return self.forward(self.new_cache(len(ids)), ids, out=out)
