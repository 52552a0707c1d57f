"""The paged KV cache: one pool of fixed-size blocks per model, and caches that are block tables over it.

A KVPool holds every layer's keys and values in blocks of kernels.kv.BLOCK positions (the layout is kernels/kv.py's),
allocated by the backend on first use (host memory is backed only as blocks are written). A KVCache is the ids of
the tokens it holds and the table of blocks holding their keys and values: memory held is tokens held, rounded up
to a block.

Full blocks are shared by prefix, as vLLM's automatic prefix caching does: a block that fills is registered under
a hash of every token up to its end (a chain: the previous block's hash and this block's tokens), and a cache whose
prompt starts with the same tokens takes the same block (`reuse`) instead of computing it again. Blocks are
reference-counted; a block no cache holds but that is registered stays as a cached prefix until its memory is
needed (least recently freed first). A cache never writes into a block another cache holds: writing into a shared
block (after a trim into it) copies it first.
"""
import hashlib
import heapq
import threading
from collections import OrderedDict

import numpy as np

from .errors import TinyhunError
from .kernels.kv import BLOCK, KINDS, allocate


class KVMemoryFull(TinyhunError):
    """Every block of the pool is held: a sequence cannot grow until another frees some."""


class KVPool:
    def __init__(self, backend, cfg, kind, memory):
        if kind not in KINDS:
            raise TinyhunError(f"kv_dtype {kind!r}: expected one of {', '.join(KINDS)}")
        self.backend, self.cfg, self.kind = backend, cfg, kind
        per_value = np.dtype(KINDS[kind]).itemsize + (4 / cfg.head_dim if kind == "int8" else 0)
        self.token_bytes = int(2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * per_value)
        self.block_bytes = self.token_bytes * BLOCK
        self.blocks = max(1, int(memory // self.block_bytes))
        self._layers = None
        self._lock = threading.RLock()   # reentrant: a cache dropped by the collector mid-allocation frees blocks
        self._refs = np.zeros(self.blocks, np.int32)
        self._free = list(range(self.blocks))   # a heap: the lowest block first keeps the memory touched compact
        self._cached = OrderedDict()             # block -> None: held by no cache, registered; oldest first
        self._by_hash, self._hash_of = {}, {}
        self.prompt_tokens = self.hit_tokens = 0   # offered to `reuse`, and found as shared blocks there

    @property
    def layers(self):
        """One kernels.kv.KVBlocks per layer (allocated on first use)."""
        if self._layers is None:
            with self._lock:
                if self._layers is None:
                    c = self.cfg
                    self._layers = allocate(self.backend.zeros, c.num_layers, self.blocks, c.num_kv_heads,
                                            c.head_dim, self.kind)
        return self._layers

    @property
    def used(self):
        """Blocks some cache holds."""
        return self.blocks - len(self._free) - len(self._cached)

    @property
    def cached(self):
        """Blocks no cache holds that keep a registered prefix (reusable until evicted)."""
        return len(self._cached)

    def available(self):
        return len(self._free) + len(self._cached)

    def take(self, n):
        """n blocks for one cache: free ones first, then the least recently cached prefixes; KVMemoryFull (and
        nothing taken) when there are not n."""
        with self._lock:
            if n > self.available():
                raise KVMemoryFull(f"KV memory full: {n} more blocks of {BLOCK} tokens wanted, {self.available()} of "
                                   f"{self.blocks} free ({self.block_bytes * self.blocks / 2**20:.0f} MiB of "
                                   f"{self.kind} KV; kv_memory / --kv-memory sets it)")
            out = []
            for _ in range(n):
                if self._free:
                    b = heapq.heappop(self._free)
                else:
                    b, _ = self._cached.popitem(last=False)
                    del self._by_hash[self._hash_of.pop(b)]
                self._refs[b] = 1
                out.append(b)
            return out

    def share(self, b):
        with self._lock:
            self._refs[b] += 1
            self._cached.pop(b, None)

    def release(self, blocks):
        with self._lock:
            for b in blocks:
                self._refs[b] -= 1
                if self._refs[b] == 0:
                    if b in self._hash_of:
                        self._cached[b] = None
                    else:
                        heapq.heappush(self._free, b)

    def lookup(self, h):
        with self._lock:
            return self._by_hash.get(h)

    def register(self, b, h):
        """Block b holds the full block of tokens hashed h (the first such block stays the one found)."""
        with self._lock:
            if h not in self._by_hash and b not in self._hash_of:
                self._by_hash[h], self._hash_of[b] = b, h

    def writable(self, b):
        """Block b, or a copy of it when another cache holds it too, ready to be written by its one holder."""
        with self._lock:
            if self._refs[b] == 1:
                h = self._hash_of.pop(b, None)   # its registered content is about to change
                if h is not None:
                    del self._by_hash[h]
                return b
            nb = self.take(1)[0]
            self.backend.copy_block(self.layers, b, nb)
            self.release([b])
            return nb

    def holders(self, b):
        return int(self._refs[b])

    def shared_blocks(self, ids, salt=b""):
        """How many leading full blocks of `ids` the pool holds (reuse would find them)."""
        h, n = None, 0
        while (n + 1) * BLOCK <= len(ids):
            h = block_hash(h, ids[n * BLOCK:(n + 1) * BLOCK], salt)
            if self.lookup(h) is None:
                break
            n += 1
        return n

    @property
    def hit_rate(self):
        """Prompt tokens found as shared blocks (or already held) over prompt tokens offered to `reuse`."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def common_prefix(a, b):
    """How many leading tokens two id sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def block_hash(parent, tokens, salt=b""):
    """The hash a full block of `tokens` is registered under, after the block hashed `parent` (None: the first)."""
    h = hashlib.blake2b(parent or salt, digest_size=16)
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.digest()


class KVCache:
    def __init__(self, pool, max_context, salt=b""):
        self.pool, self.max_context, self.salt = pool, max_context, salt
        self.tokens = []    # ids whose keys/values fill positions 0..len-1
        self.table = []     # the blocks holding them (and any reserved for the next positions)
        self.hashes = []    # the registered hash of each full block of tokens

    def __len__(self):
        return len(self.tokens)

    def __del__(self):
        try:
            self.pool.release(self.table)
        except Exception:   # interpreter shutdown
            pass

    @property
    def blocks(self):
        return len(self.table)

    def trim(self, n):
        """Keep the first n positions (what follows is overwritten by the next forward); blocks past them go back."""
        if not 0 <= n <= len(self.tokens):
            raise TinyhunError(f"trim({n}): the cache holds {len(self.tokens)} tokens")
        del self.tokens[n:]
        del self.hashes[n // BLOCK:]
        keep = -(-n // BLOCK)
        self.pool.release(self.table[keep:])
        del self.table[keep:]

    def reset(self):
        self.trim(0)

    def reuse(self, ids):
        """Trim to the longest prefix shared with `ids`, extend it with full blocks of `ids` that the pool holds
        (another cache's, or a finished one's), and return its length: those tokens need no recompute."""
        self.trim(common_prefix(self.tokens, ids))
        j = len(self.hashes)
        while (j + 1) * BLOCK <= len(ids) and (j + 1) * BLOCK <= self.max_context:
            part = ids[j * BLOCK:(j + 1) * BLOCK]
            h = block_hash(self.hashes[-1] if self.hashes else None, part, self.salt)
            b = self.pool.lookup(h)
            if b is None:
                break
            self.pool.share(b)
            if j < len(self.table):   # our own partial block: the shared full one replaces it
                self.pool.release([self.table[j]])
                self.table[j] = b
            else:
                self.table.append(b)
            self.hashes.append(h)
            self.tokens[j * BLOCK:] = (int(t) for t in part)
            j += 1
        self.pool.prompt_tokens += len(ids)
        self.pool.hit_tokens += len(self.tokens)
        return len(self.tokens)

    def reserve(self, n):
        """Make positions len..len+n-1 writable: blocks taken for them, and the block the next position falls in
        copied first if another cache holds it too. KVMemoryFull (nothing taken) when the pool is short."""
        start = len(self.tokens)
        if start + n > self.max_context:
            raise TinyhunError(f"context full: {start} + {n} tokens exceed max_context {self.max_context}")
        need = -(-(start + n) // BLOCK) - len(self.table)
        if need > 0:
            self.table.extend(self.pool.take(need))
        if start % BLOCK:
            i = start // BLOCK
            self.table[i] = self.pool.writable(self.table[i])

    def append(self, ids):
        """Record ids as held at the next positions (their keys and values written by the forward that ran them);
        blocks they fill are registered for sharing."""
        if len(self.tokens) + len(ids) > len(self.table) * BLOCK:
            raise TinyhunError(f"append: {len(ids)} tokens past the {len(self.table)} blocks reserved")
        self.tokens.extend(int(i) for i in ids)
        for j in range(len(self.hashes), len(self.tokens) // BLOCK):
            h = block_hash(self.hashes[-1] if self.hashes else None, self.tokens[j * BLOCK:(j + 1) * BLOCK],
                           self.salt)
            self.hashes.append(h)
            self.pool.register(self.table[j], h)
