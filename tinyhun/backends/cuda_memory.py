"""What the CUDA backend keeps on the device: its weight formats (prepared once at load, tinyhun.backends.cuda), one
thread's scratch (activation buffers, the rows' indices and block tables, the stream and the CUDA graphs of its
steps), the KV pool's blocks, and `device_view`, the host weights as the device multiplies by them (the NumPy
reference of what the device computes)."""
import math
import weakref
from typing import NamedTuple

import numpy as np
from numba import config

from ..structs import MoEMLP, Rows, weight_arrays

# the device type of each host storage type of the KV pool (kernels/kv.py): fp16 is held as its bits on the host,
# where Numba has no float16, and as float16 on the device
KV_DEVICE_DTYPE = {np.dtype(np.float32): np.float32, np.dtype(np.uint16): np.float16, np.dtype(np.int8): np.int8}
SIM_KV_MEMORY = 64 << 20   # the pool's default under the simulator, which reports unlimited device memory


class CudaDense(NamedTuple):
    gate_up: object        # device linear [2 I, H], rows gate_0, up_0, gate_1, ...
    down: object           # [H, I]


class CudaMoE(NamedTuple):
    router: object         # float32[E, H] (fp32, as on the CPU)
    experts: object        # kernels.cuda_ref.Experts of device linears (the shared MLP among them when stacked)
    apart: object          # CudaDense: a shared MLP that could not be stacked with the experts; None: none such
    topk: int              # k
    load: np.ndarray       # host int64[E]: tokens routed to each expert while counting (tinyhun.moe_stats)
    counting: np.ndarray   # host bool[1], the model's switch


class CudaLayer(NamedTuple):
    attn_norm: object      # float32[H]
    qkv: object            # device linear [(nh + 2 nkv) d, H]: q, k, v rows stacked
    wo: object             # [H, nh d]
    q_norm: object         # float32[d], or a host [0] when the family has no QK-norm
    k_norm: object
    mlp_norm: object       # float32[H]
    mlp: object            # CudaDense or CudaMoE


class CudaWeights(NamedTuple):
    embed: object          # device linear [V, H]
    layers: tuple          # CudaLayer per decoder layer
    norm: object           # float32[H]
    lm_head: object        # device linear [V, H]; the embedding itself when tied

    def arrays(self, decode=False):
        """Every device array once (see structs.Weights.arrays)."""
        return weight_arrays(self, decode, lambda v: hasattr(v, "copy_to_host"))

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.arrays())

    @property
    def decode_bytes(self):
        """Bytes a decoded token reads: of a mixture of experts only its k experts' (and a stacked shared MLP's)."""
        idle = 0
        for layer in self.layers:
            if isinstance(layer.mlp, CudaMoE):
                ex = layer.mlp.experts
                held = sum({id(a): a.nbytes for w in (ex.gate_up, ex.down) for a in w
                            if hasattr(a, "copy_to_host")}.values())
                idle += held * (ex.n_experts - ex.topk) // (ex.n_experts + ex.shared)
        return sum(a.nbytes for a in self.arrays(decode=True)) - idle


class Shaped(NamedTuple):
    """A part of a device linear as tinyhun.adapters.attach sees it when an adapter goes beside weights already on
    the device: only its shape."""
    shape: tuple


class CudaBuffers(NamedTuple):
    """Device activation scratch for up to R rows; `rows(T)` views the first T rows."""
    x: object              # [R, H] residual stream
    xn: object             # the residual stream again: the CUDA kernels norm as they load, so no normed copy
    qkv: object            # [R, (nh + 2 nkv) d]
    q: object              # [R, nh, d] queries after RoPE (and QK-norm)
    attn: object           # [R, nh, d]
    attn2: object          # attn as [R, nh d]
    h: object              # [R, I] silu(gate) * up
    part: object           # flat float32 attention partials, R * nh * MAX_SPLITS * (d + 2)
    acts: object           # None: no int8 activation scratch on the device

    moe: object = None     # kernels.cuda_moe.MoEScratch of a mixture-of-experts model
    side: object = None    # flat float32, R * side_width(cfg): a LoRA side path's t

    def rows(self, T):
        return CudaBuffers(*(b[:T] for b in self[:7]), self.part, None, self.moe, self.side)


def side_width(cfg):
    """Columns of t a LoRA side path needs at most: three adapted parts (q, k, v) of rank hidden/4 each (the most
    tinyhun.adapters allows)."""
    return 3 * (cfg.hidden_size // 4)


class DeviceScratch:
    """One thread's device buffers (Model asks the backend for it), its stream, host staging for what crosses, and
    the CUDA graphs of its steps."""

    def __init__(self, cuda, cfg, rows, max_blocks):
        from ..kernels.cuda_attention import MAX_SPLITS   # numba.cuda: imported once a GPU was found

        def dev(*shape):
            return cuda.device_array(shape, np.float32)
        nh, d = cfg.num_heads, cfg.head_dim
        x, attn = dev(rows, cfg.hidden_size), dev(rows, nh, d)
        moe = None
        if cfg.has_experts:
            from ..kernels.cuda_moe import MoEScratch
            k = max(cfg.moe_topk)
            moe = MoEScratch(cuda, rows, cfg.hidden_size, k, k + 1, max(cfg.moe_intermediate_size),
                             max(cfg.num_experts) + 1)
        self.bufs = CudaBuffers(x, x, dev(rows, cfg.q_dim + 2 * cfg.kv_dim), dev(rows, nh, d), attn,
                                attn.reshape(rows, nh * d), dev(rows, cfg.intermediate_size),
                                dev(rows * nh * MAX_SPLITS * (d + 2)), None, moe, dev(rows * side_width(cfg)))
        self.slots = np.zeros(rows, np.int64)        # filled by Model.forward / forward_batch
        self.positions = np.zeros(rows, np.int64)
        self.tables = cuda.pinned_array((rows, max_blocks), np.int32)   # each sequence's block table (Model fills)
        self.tables[:] = 0
        self._sent = np.zeros((rows, max_blocks), np.int32)             # what the device's copy holds
        self._tables = cuda.to_device(self._sent)
        # a stream of its own: the legacy default stream cannot be captured into a graph
        self.stream = cuda.stream()
        self._stage = cuda.pinned_array(3 * rows, np.int64)
        self._index = cuda.device_array(3 * rows, np.int64)
        self._logits = dev(rows, cfg.vocab_size)
        self._host_logits = cuda.pinned_array((rows, cfg.vocab_size), np.float32)
        self._picks = cuda.device_array(rows, np.int64)
        self._host_picks = cuda.pinned_array(rows, np.int64)
        from ..kernels.cuda_linear import argmax_rows
        self._argmax = argmax_rows
        # KV pool -> {(rows, logits rows, argmax): None (seen once) or its graph}
        self.graphs = weakref.WeakKeyDictionary()

    def rows(self, T, rope, ids):
        """structs.Rows on the device: slots, positions and token ids uploaded in one copy, always into the same
        device array, and the block tables into theirs (a graph reads them there); cos/sin are the whole tables
        (the RoPE kernel indexes them by position)."""
        st = self._stage
        st[:T], st[T:2 * T], st[2 * T:3 * T] = self.slots[:T], self.positions[:T], ids
        self._index[:3 * T].copy_to_device(st[:3 * T], stream=self.stream)
        self._send_tables(int(self.slots[:T].max()) + 1)
        return Rows(self._index[:T], self._index[T:2 * T], rope[0], rope[1], self._index[2 * T:3 * T], self._tables)

    def _send_tables(self, n):
        """The block tables of sequences 0..n-1 to the device where they changed: a decode step uploads nothing
        until a sequence takes a new block (one entry then), another cache's turn its changed entries."""
        new, old = self.tables[:n], self._sent[:n]
        changed = np.flatnonzero((new != old).any(axis=1))
        if not len(changed):
            return
        if len(changed) == 1:   # one sequence: the span of entries that changed
            r = changed[0]
            cols = np.flatnonzero(new[r] != old[r])
            rows, cols = slice(r, r + 1), slice(cols[0], cols[-1] + 1)
        else:                   # several: the rows from the first to the last that changed
            rows, cols = slice(changed[0], changed[-1] + 1), slice(None)
        self._tables[rows, cols].copy_to_device(self.tables[rows, cols], stream=self.stream)
        self._sent[rows, cols] = self.tables[rows, cols]

    def logits_out(self, n, vocab, into):
        return self._logits[:n]

    def to_host(self, out, into):
        """The logits rows down to the host, the step's one wait: into `into` when given, else a staging array
        valid until the next forward of this thread."""
        host = self._host_logits[:len(out)] if into is None else into
        out.copy_to_host(host, stream=self.stream)
        self.stream.synchronize()
        return host

    def pick(self, out):
        """Each logits row's argmax on the device (a launch of the step, so inside its graph)."""
        self._argmax(self._picks[:len(out)], out)

    def picked(self, n):
        """The picked ids down to the host (n x 8 bytes instead of n logits rows), valid until the next forward."""
        host = self._host_picks[:n]
        self._picks[:n].copy_to_host(host, stream=self.stream)
        self.stream.synchronize()
        return host

def device_view(w):
    """Host weights (a structs.Weights or any part of it) as the device multiplies by them, as F32: floats and INT8
    rounded to fp16, INT4 dequantized, stacked experts one by one, a LoRA side path merged (in fp16, as the device
    holds it); the router stays fp32. Run by the NumPy backend with the KV storage of the device's model (kv_dtype),
    the reference of exactly what the device computes (tests and bench/gpu_check.py compare the two)."""
    from ..kernels import cuda_ref, moe
    from ..kernels.linear import F32, Q4, Q8, LoRA

    def seen(lin):
        return F32(cuda_ref.dense(cuda_ref.device_format(lin)))
    if isinstance(w, (F32, Q4, Q8, LoRA)):
        return seen(w)
    if isinstance(w, MoEMLP):
        return w._replace(shared=device_view(w.shared), **{
            f: F32(np.stack([seen(moe.expert(getattr(w, f), e)).w for e in range(len(w.router))]))
            for f in ("gate", "up", "down")})
    if isinstance(w, tuple):
        parts = [device_view(v) for v in w]
        return type(w)(*parts) if hasattr(w, "_fields") else tuple(parts)
    return w


def device_zeros(cuda, shape, dtype):
    """A KV pool array on the device, zeroed there (no host array of its size); an empty one (the scales of a
    storage without them) stays on the host: no kernel reads it."""
    if not math.prod(shape):
        return np.zeros(shape, dtype)
    dtype = KV_DEVICE_DTYPE[np.dtype(dtype)]
    if config.ENABLE_CUDASIM:   # a simulated device array is a host array
        return cuda.to_device(np.zeros(shape, dtype))
    from numba.cuda.cudadrv.driver import device_memset
    a = cuda.device_array(shape, dtype)
    device_memset(a, 0, a.nbytes)
    return a


def kv_memory(cuda):
    """The KV pool's default size on the device: half the device memory free now (after the weights)."""
    free = cuda.current_context().get_memory_info()[0]
    return int(free // 2) if math.isfinite(free) else SIM_KV_MEMORY
