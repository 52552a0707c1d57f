"""What a backend must provide: every method the engine calls on a backend (tinyhun.model.Model, the KV pool of
tinyhun.kv_cache, tinyhun.prompt_cache, tinyhun.model.with_adapter) and every member it uses of the per-thread
scratch a backend hands out. tests/test_backend_contract.py checks that each backend implements all of it and that
the engine calls nothing that is not written here.

A backend owns memory and runs the layers; the engine owns the order of things (which rows run, at which positions,
in which cache blocks) and hands the backend only arrays it allocated itself.
"""
from typing import Protocol, runtime_checkable


@runtime_checkable
class Scratch(Protocol):
    """One thread's working memory for a forward of up to `rows` rows (Backend.scratch): a forward allocates
    nothing large. Model fills slots, positions and tables before each forward, then reads through the methods."""

    bufs: object        # activation buffers (structs.Buffers on the host); `bufs.rows(T)` views the first T rows
    slots: object       # int64[rows], host: the row's sequence, its index into `tables`
    positions: object   # int64[rows], host: each row's position in its sequence
    tables: object      # int32[rows, max_blocks], host-writable: each sequence's KV block table

    def rows(self, T, rope, ids):
        """structs.Rows of the first T rows as the layer reads them: slots, positions and token ids `ids`, the
        block tables and the RoPE cos/sin of those positions (rope: what Backend.rope_tables returned)."""

    def logits_out(self, n, vocab, into):
        """The array the lm_head writes n rows of logits into: `into` (a host array [n, vocab]) when the backend
        can write there, else its own; valid until this thread's next forward."""

    def to_host(self, out, into):
        """The logits written into `out` (logits_out's) as a host array: `into` when given, else the scratch's;
        waits for the forward to finish."""

    def pick(self, out):
        """Each row of `out`'s argmax (ties to the lowest id), kept for `picked`; called inside the step, so a
        backend that replays steps replays it too."""

    def picked(self, n):
        """The ids `pick` chose for the first n rows, as host int64[n], valid until this thread's next forward."""


@runtime_checkable
class Backend(Protocol):
    """Allocates the KV pool and the scratch, prepares weights, and runs a family's layers and the lm_head."""

    name: str   # as tinyhun.backends.select names it: "numba", "numpy" or "cuda"

    def prepare(self, weights):
        """structs.Weights (host arrays, as loaded) -> the weights as this backend's layers read them (once, at
        load). Already-prepared weights (an adapter's, from `attach`) come back as they are."""

    def attach(self, weights, cfg, adapter, mode=None):
        """Prepared weights with an adapter (adapters.Adapter) attached, merged (mode "merge") or as a LoRA side
        path ("side"; None: adapters.attach's default), sharing every base array; prepared as `prepare`'s."""

    def kv_memory(self):
        """Bytes the KV pool may hold when the caller does not say; None: the host's default
        (model.default_kv_memory)."""

    def zeros(self, shape, dtype):
        """A zeroed KV pool array (kernels.kv.allocate's allocator) in this backend's memory; memory held only as
        it is written where the backend can."""

    def copy_block(self, layers, src, dst):
        """Block src's keys and values (and scales) into block dst, in every layer (kernels.kv.KVBlocks): a
        shared block copied before a cache writes into it."""

    def read_blocks(self, layers, blocks):
        """Each KVBlocks field's given blocks of every layer, as host arrays [L, len(blocks), ...], fp16 as its
        uint16 bits (a prompt cache file is the same from every backend)."""

    def write_blocks(self, layers, blocks, fields):
        """read_blocks' arrays back into the given blocks."""

    def scratch(self, cfg, rows, max_blocks) -> Scratch:
        """A new Scratch for forwards of up to `rows` rows over caches of up to `max_blocks` blocks."""

    def rope_tables(self, cfg, n):
        """What Scratch.rows turns positions 0..n-1 into RoPE angles with (computed once per model)."""

    def embed(self, out, table, ids):
        """out[i] = the embedding row of ids[i] (table: the prepared embedding; ids: Rows.ids)."""

    def layer(self, family):
        """The callable running one of the family's decoder layers:
        layer(layer_weights, buffers, kv, rows, dims) updates buffers.x in place and stores the rows' keys and
        values in kv (that layer's KVBlocks)."""

    def logits(self):
        """The callable computing logits: logits(out, x, norm, lm_head, xn, acts, eps) writes
        lm_head @ rmsnorm(x) into out (xn, acts: scratch)."""

    def run(self, scratch, key, step):
        """Run step() (one forward's embed, layers, logits and pick) now. key (pool, rows, logits rows, argmax)
        names the arrays it uses: a backend may replay a step seen before with the same key (CUDA graphs)."""

    def first_run(self):
        """A context manager around each forward: e.g. saying, when it takes long, that kernels are compiling."""


def members(protocol):
    """The names a class must provide to follow `protocol` (its methods and annotated attributes)."""
    own = {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}
    return own | set(getattr(protocol, "__annotations__", {}))
