"""The KV cache as an object: which tokens it holds, `trim(n)`, and reuse of a shared prefix.

A KVPool holds the keys and values of `slots` sequences, [L, slots, nkv, S, d] each, allocated once by the
backend (so a device backend keeps them on the device); a KVCache is one slot of it plus the ids of the tokens
whose keys and values it holds. Several caches of one pool can go through one forward together (one new token
each, Model.forward_batch): the weights are read once for all of them.
"""
import numpy as np

from .errors import TinyhunError


class KVPool:
    def __init__(self, backend, cfg, slots, max_context):
        shape = (cfg.num_layers, slots, cfg.num_kv_heads, max_context, cfg.head_dim)
        self.k = backend.zeros(shape, np.float32)   # keys after RoPE (and QK-norm)
        self.v = backend.zeros(shape, np.float32)
        self.max_context = max_context

    def caches(self):
        """One KVCache per slot. They hold the pool, not the other way round: no reference cycle, so the memory
        goes as soon as the last cache does (not at the next garbage collection)."""
        return [KVCache(self, slot) for slot in range(self.k.shape[1])]


class KVCache:
    def __init__(self, pool, slot):
        self.pool, self.slot = pool, slot
        self.tokens = []       # ids whose keys/values fill positions 0..len-1

    @property
    def max_context(self):
        return self.pool.max_context

    def __len__(self):
        return len(self.tokens)

    def trim(self, n):
        """Keep the first n positions (what follows is overwritten by the next forward)."""
        if not 0 <= n <= len(self.tokens):
            raise TinyhunError(f"trim({n}): the cache holds {len(self.tokens)} tokens")
        del self.tokens[n:]

    def reset(self):
        self.trim(0)

    def reuse(self, ids):
        """Trim to the longest prefix shared with `ids` and return its length: those tokens need no recompute."""
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        self.trim(n)
        return n

    def append(self, ids):
        if len(self.tokens) + len(ids) > self.max_context:
            raise TinyhunError(f"context full: {len(self.tokens)} + {len(ids)} tokens exceed max_context "
                               f"{self.max_context}")
        self.tokens.extend(int(i) for i in ids)
