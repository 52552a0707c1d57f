"""The host backends (tinyhun.backends.contract's Backend in host memory) and their scratch.

The NumPy backend runs the family's blocks as Python over the reference ops; the Numba backend compiles the same
functions (tinyhun.blocks, families/*.decoder_layer) into one call per layer, where every op name becomes its
Numba kernel. `TINYHUN_KERNELS=numpy` selects the reference.
"""
import sys
import threading

import numpy as np

from .. import blocks
from ..adapters import attach
from ..structs import Buffers, DenseMLP, MoEMLP, Rows


class HostScratch:
    """One thread's activation buffers in host memory: a forward allocates nothing large."""

    def __init__(self, cfg, rows, max_blocks):
        self.bufs = Buffers.allocate(cfg, rows)
        self.slots = np.zeros(rows, np.int64)       # filled by Model.forward / forward_batch
        self.positions = np.zeros(rows, np.int64)
        self.tables = np.zeros((rows, max_blocks), np.int32)   # each sequence's block table
        self._angles = np.zeros((rows, cfg.head_dim // 2), np.float32)
        self.ids = np.zeros(rows, np.int64)
        self.cos = np.zeros((rows, cfg.head_dim // 2), np.float32)
        self.sin = np.zeros((rows, cfg.head_dim // 2), np.float32)
        self.logits = np.zeros((1, cfg.vocab_size), np.float32)
        self.picks = np.zeros(rows, np.int64)

    def rows(self, T, rope, ids):
        """structs.Rows of the first T rows, token ids `ids`, the RoPE angles of their positions (rope: the
        backend's rope_tables, here the inverse frequencies; fp32 angles as in a table transformers computes)."""
        self.ids[:T] = ids
        rows = Rows(self.slots[:T], self.positions[:T], self.cos[:T], self.sin[:T], self.ids[:T], self.tables)
        a = self._angles[:T]
        np.multiply(rows.positions[:, None].astype(np.float32), rope[None, :], out=a)
        np.cos(a, out=rows.cos)
        np.sin(a, out=rows.sin)
        return rows

    def logits_out(self, n, vocab, into):
        """Where the backend writes n rows of logits: `into` (a host array) when given, else this scratch."""
        if into is not None:
            return into
        if len(self.logits) < n:
            self.logits = np.zeros((n, vocab), np.float32)
        return self.logits[:n]

    def to_host(self, out, into):
        """The logits written into `out` (logits_out's), as a host array: here they already are."""
        return out

    def pick(self, out):
        """Each logits row's argmax (ties to the lowest id), kept for `picked`."""
        np.argmax(out, axis=1, out=self.picks[:len(out)])

    def picked(self, n):
        return self.picks[:n]


def inv_freq(cfg):
    d = cfg.head_dim
    return np.float32(1.0) / (np.float32(cfg.rope_base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))


def rope_table(cfg, n):
    """cos/sin [n, d/2] of positions 0..n-1 in float32, as transformers computes them (fp32 angles)."""
    angles = np.arange(n, dtype=np.float32)[:, None] * inv_freq(cfg)[None, :]
    return np.cos(angles), np.sin(angles)


class NumpyBackend:
    name = "numpy"

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)   # calloc: pages are backed as blocks are first written

    def kv_memory(self):
        """The KV pool's size when the model is not told (bytes), for a backend whose memory is not the host's;
        None: the host's default (model.default_kv_memory)."""
        return None

    def copy_block(self, layers, src, dst):
        """Block src's keys and values (and scales) into block dst, in every layer (kernels.kv.KVBlocks)."""
        for kv in layers:
            for a in kv:
                if a.size:
                    a[dst] = a[src]

    def read_blocks(self, layers, blocks):
        """Each KVBlocks field's given blocks of every layer, as host arrays [L, len(blocks), ...]."""
        return [np.stack([f[blocks] if f.size else f for f in fields]) for fields in zip(*layers)]

    def write_blocks(self, layers, blocks, fields):
        """read_blocks' arrays back into the given blocks (a field of size 0: none stored)."""
        for i, kv in enumerate(layers):
            for dst, src in zip(kv, fields):
                if dst.size:
                    dst[blocks] = src[i]

    def scratch(self, cfg, rows, max_blocks):
        return HostScratch(cfg, rows, max_blocks)

    def prepare(self, weights):
        """Weights as this backend reads them: host arrays, as loaded (memory-mapped where they were fp32)."""
        return weights

    def attach(self, weights, cfg, adapter, mode=None):
        """Prepared weights with a peft adapter attached (tinyhun.adapters.attach), sharing every base array."""
        return attach(weights, cfg, adapter, mode)

    def rope_tables(self, cfg, n):
        """What the scratch's `rows` turns positions into RoPE angles with: the inverse frequencies [d/2] (fp32,
        as transformers computes them); a row's angles are its position times them, computed per forward."""
        return inv_freq(cfg)

    def embed(self, out, table, ids):
        table.rows(out, ids)

    def run(self, scratch, key, step):
        """step(): one forward's layers, run now. key (pool, rows, logits rows, argmax) names the arrays it uses, for
        a backend that replays steps (the CUDA backend's graphs)."""
        step()

    def layer(self, family):
        return family.decoder_layer

    def logits(self):
        return blocks.logits

    def first_run(self):
        return _Quiet()


class _Quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CompileNotice:
    """Says what is happening when the first forward of a process takes long: Numba is compiling (then caches)."""
    shown = False

    def __enter__(self):
        def say():
            from ..kernels.numba_env import cache_dir
            _CompileNotice.shown = True
            print(f"tinyhun: compiling kernels, first run only (cached in {cache_dir()})...", file=sys.stderr,
                  flush=True)
        self.timer = threading.Timer(1.5, say)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        return False


class NumbaBackend(NumpyBackend):
    name = "numba"
    _compiled = {}
    _lock = threading.Lock()
    _warm = False

    def __init__(self):
        from ..kernels import cpu  # noqa: F401  (registers the Numba kernels of every op name)

    def _jit(self, fn, mlp_type):
        with self._lock:
            key = (fn, mlp_type)
            if key not in self._compiled:
                self._compiled[key] = fused_layer(fn, mlp_type)
            return self._compiled[key]

    def layer(self, family):
        return _ResolvedLayer(lambda mlp_type: self._jit(family.decoder_layer, mlp_type))

    def logits(self):
        # from Python, as blocks.logits composes it: called once per forward, and a kernel compiled only when a call
        # needs it (a decode step never compiles the lm_head's prefill GEMM)
        from ..kernels import cpu, cpu_linear

        def logits(out, x, norm, lm_head, xn, acts, eps):
            cpu.rmsnorm(xn, x, norm, eps)
            cpu_linear.matmul(out, xn, lm_head, acts)
        return logits

    def first_run(self):
        if NumbaBackend._warm:
            return _Quiet()
        NumbaBackend._warm = True
        return _CompileNotice()


def fused_layer(decoder_layer, mlp_type):
    """A family's decoder_layer compiled into one Numba function, with tinyhun.blocks' functions inlined into it.

    Why inlined: Numba compiles a called function (a `register_jitable` block, an overload) as a library of its own
    and links it into each caller, where LLVM optimizes and emits all of it again, so every level of calls above a
    kernel costs a pass over the kernel's code (blocks.attention alone cost ~5 s of a cold start). Numba's
    untyped inlining (`njit(inline="always")`) puts a block's code into the layer's before typing, so it is never a
    library of its own. Copies of the functions are inlined (their globals rebound: the layer's `mlp` to the block
    of this model's MLP type, structs.DenseMLP or MoEMLP), so the blocks stay plain Python for the NumPy backend.
    A name the family binds to something else is left alone: it compiles as before."""
    from numba import njit

    from ..kernels.cpu_math import JIT, function_copy

    def inline(fn, names=None):
        return njit(inline="always")(function_copy(fn, names=names))
    dense = inline(blocks.dense_mlp)
    mlps = {DenseMLP: dense, MoEMLP: inline(blocks.moe_mlp, {"dense_mlp": dense})}
    swap = {id(blocks.attention): inline(blocks.attention), id(blocks.mlp): mlps[mlp_type], id(blocks.dense_mlp): dense}
    names = {name: swap[id(value)] for name, value in decoder_layer.__globals__.items() if id(value) in swap}
    return njit(**JIT)(function_copy(decoder_layer, names=names))


class _ResolvedLayer:
    """A compiled decoder layer called without Numba's per-call type dispatch.

    Numba's dispatcher types every argument on each call, and a nested NamedTuple of weights has no fast (C-level)
    fingerprint: typing one layer's weights on every call is a visible share of a decode step.
    A layer's argument types never change after load (its own weights; the model's buffers, cache and rows, always
    the same kinds of arrays), so each layer's compiled entry point is looked up once, on its first call, and called
    directly after that. One object per Model: it keeps only that model's layers alive.
    """

    def __init__(self, compiled):
        self.compiled = compiled   # MLP type -> the layer's dispatcher (fused_layer)
        self.entries = {}   # id(layer weights) -> (the weights, kept alive so the id stays theirs; entry point)

    def __call__(self, lw, *args):
        hit = self.entries.get(id(lw))
        if hit is not None:
            return hit[1](lw, *args)
        from numba import typeof
        from numba.core.typing.typeof import Purpose
        dispatcher = self.compiled(type(lw.mlp))
        result = dispatcher(lw, *args)   # compiles or loads from the cache
        sig = tuple(typeof(a, Purpose.argument) for a in (lw, *args))
        self.entries[id(lw)] = (lw, dispatcher.get_overload(sig))
        return result

