"""The CUDA backend: the whole forward pass on an NVIDIA GPU with the numba.cuda kernels of tinyhun.kernels.cuda_*.

At load (`prepare`) the weights go to the device once: float and INT8 matrices as fp16, INT4 kept INT4 in the
row layout of kernels.cuda_ref.R4; q, k and v become one matrix (one GEMV), gate and up one matrix with their rows
interleaved (the GEMV writes silu(gate) * up). The KV pool's blocks (kernels/kv.py's layout, fp16, int8 or fp32 as
the model's kv_dtype), the activation buffers, the block tables and the RoPE tables live on the device
(tinyhun.backends.cuda_memory); per forward only the token ids, slots and positions go up, with the block-table
entries that changed, and the logits rows (or, picking greedily, the picked ids) come down.

A decoder layer is six launches (seven when the context is longer than one split of attention along the sequence):
  1 RMSNorm + QKV GEMV   2 RoPE + QK-norm + KV store   3 attention   4 o_proj GEMV + residual add
  5 RMSNorm + gate/up GEMV + SiLU * up                 6 down GEMV + residual add
A mixture of experts (kernels.cuda_moe) replaces 5 and 6 by three launches when decoding: 5 RMSNorm + router +
top-k, 6 the picked experts' gate/up GEMVs (the shared MLP among them when it has their width and format), 7 their
downs weighted + residual add; a prefill adds two, the sort grouping its rows by expert before the gate/up GEMM
and the weighted combine after the down GEMM.
A shared MLP of another width or format runs beside them as the dense MLP's two launches. An adapter kept as a
LoRA side path adds one launch per adapted linear (QKV, o_proj, gate/up, down): its A product, before the GEMV
that adds the B product to each output (kernels.cuda_linear).

Every launch goes to the thread's own stream, and a step that repeats (a decode step: the same pool, the same
number of rows) is captured as a CUDA graph on its second run and replayed from then on: one host launch per token
instead of ~150 for a 24-layer model. That works because a step's kernels read everything that changes from device
memory at fixed addresses (token ids, slots, positions and block tables uploaded before the graph runs, the KV
blocks found through the tables on the device), never from launch arguments. TINYHUN_CUDA_GRAPHS=0 turns graphs
off.
"""
import os
import warnings

import numpy as np

from ..adapters import attach
from ..errors import TinyhunError
from ..structs import Attention, DenseMLP, Layer, MoEMLP, Weights
from .cuda_memory import (CudaDense, CudaMoE, CudaLayer, CudaWeights, DeviceScratch, Shaped, device_zeros,
                          kv_memory)
from .host import NumpyBackend, _Quiet, rope_table


def graphs_wanted():
    """TINYHUN_CUDA_GRAPHS: 1 (the default) replays repeated steps as CUDA graphs, 0 launches every kernel."""
    v = os.environ.get("TINYHUN_CUDA_GRAPHS", "1")
    if v not in ("0", "1"):
        raise TinyhunError(f"TINYHUN_CUDA_GRAPHS={v!r}: expected 0 or 1")
    return v == "1"


def require_cuda():
    """numba.cuda with a usable GPU, else a one-line TinyhunError saying what is missing."""
    try:
        from numba import cuda
    except ImportError:
        raise TinyhunError("device 'cuda' needs numba-cuda: pip install 'tinyhun[cuda]'") from None
    if not cuda.is_available():
        raise TinyhunError("device 'cuda': no CUDA GPU or driver found (numba.cuda.is_available() is false); "
                           "use device 'cpu'")
    return cuda


class CudaBackend(NumpyBackend):
    name = "cuda"

    def __init__(self):
        self.cuda = require_cuda()
        from ..kernels import cuda_attention, cuda_common, cuda_linear, cuda_moe, cuda_ref
        self.k_attn, self.k_common, self.k_linear, self.k_ref = cuda_attention, cuda_common, cuda_linear, cuda_ref
        self.k_moe = cuda_moe
        self.graphs = graphs_wanted()
        self._counting = []   # the MoE layers' routing-statistics switches (each once): a counting step reads ids
        # on the host

    @property
    def launches(self):
        """Kernels run so far in this process (a graph's each time it runs)."""
        return self.k_common.LAUNCHES[0]

    @property
    def host_launches(self):
        """Launch calls from the host so far: a kernel launched alone or a whole graph, one each."""
        c = self.k_common
        return c.LAUNCHES[0] - c.REPLAYED[0] + c.GRAPH_LAUNCHES[0]

    def run(self, scratch, key, step):
        """A forward's launches on the thread's stream. A step seen a second time with the same key (pool, rows,
        logits rows, argmax) is captured as a CUDA graph and replayed from then on: its first run compiles and loads
        every kernel (a capture must not), and a step that runs once (a prompt's prefill) is not worth capturing.
        Straight through when graphs are off, and while routing is counted (that reads ids on the host)."""
        with self.k_common.on(scratch.stream):
            if not self.graphs or any(c[0] for c in self._counting):
                return step()
            steps, shape = scratch.graphs.setdefault(key[0], {}), key[1:]
            graph = steps.get(shape, False)
            if graph is False:
                steps[shape] = None
                return step()
            if graph is None:
                try:
                    graph = steps[shape] = self.k_common.capture(step, scratch.stream)
                except Exception as e:   # e.g. a driver or cuda.core that cannot capture: the step still runs
                    self.graphs = False
                    warnings.warn(f"device 'cuda': CUDA graph capture failed ({type(e).__name__}: {e}); launching "
                                  "kernel by kernel", RuntimeWarning, stacklevel=2)
                    return step()
            graph.launch()

    def zeros(self, shape, dtype):
        """The KV pool's allocator (its only caller): its blocks on the device, fp16 as float16 (cuda_memory)."""
        return device_zeros(self.cuda, shape, dtype)

    def kv_memory(self):
        return kv_memory(self.cuda)

    def copy_block(self, layers, src, dst):
        """Block src's keys and values (and scales) into block dst in every layer, device to device (ordered
        after the steps before it and before those after: the default stream waits for the scratch's)."""
        for kv in layers:
            for a in kv:
                if a.size:
                    a[dst].copy_to_device(a[src])

    def read_blocks(self, layers, blocks):
        """Each field's given blocks of every layer as host arrays [L, len(blocks), ...], fp16 as the host holds
        it (uint16 bits: a prompt cache file is the same from either backend)."""
        def host(f):
            if not f.size:
                return f
            a = np.stack([f[b].copy_to_host() for b in blocks])
            return a.view(np.uint16) if a.dtype == np.float16 else a
        return [np.stack([host(f) for f in fields]) for fields in zip(*layers)]

    def write_blocks(self, layers, blocks, fields):
        """read_blocks' arrays back into the given blocks on the device."""
        for i, kv in enumerate(layers):
            for dst, src in zip(kv, fields):
                if dst.size:
                    for j, b in enumerate(blocks):
                        dst[b].copy_to_device(np.ascontiguousarray(src[i, j]).view(dst.dtype))

    def scratch(self, cfg, rows, max_blocks):
        return DeviceScratch(self.cuda, cfg, rows, max_blocks)

    def _put(self, a):
        return self.cuda.to_device(np.ascontiguousarray(a))

    def _linear(self, fmt):
        """A device linear of host arrays (an Adapted one's base and side too) -> the same with its arrays on the
        device, each distinct array once (a symmetric INT4 matrix's mins are its scales)."""
        up = {id(f): self._put(f) for f in fmt if isinstance(f, np.ndarray)}
        return type(fmt)(*(up[id(f)] if isinstance(f, np.ndarray) else self._linear(f) if isinstance(f, tuple)
                           else f for f in fmt))

    def _dense(self, gate_up, down):
        return CudaDense(self._linear(gate_up), self._linear(down))

    def _mlp(self, i, m):
        fmt, stack = self.k_ref.device_format, self.k_ref.stack
        if isinstance(m, DenseMLP):
            return self._dense(stack([fmt(m.gate), fmt(m.up)], interleave=True), fmt(m.down))
        if not isinstance(m, MoEMLP):
            raise TinyhunError(f"device 'cuda': layer {i} has a {type(m).__name__} MLP, which does not run on the "
                               "GPU (use device 'cpu')")
        ex, apart = self.k_ref.experts_of(m.gate, m.up, m.down, m.topk, m.shared if m.has_shared else None)
        ex = ex._replace(gate_up=self._linear(ex.gate_up), down=self._linear(ex.down))
        if not any(c is m.counting for c in self._counting):
            self._counting.append(m.counting)
        return CudaMoE(self._put(m.router), ex, apart and self._dense(*apart), m.topk, m.load, m.counting)

    def attach(self, weights, cfg, adapter, mode=None):
        """CudaWeights with an adapter's LoRA side paths beside their device bases, which are shared, not copied
        (model.with_adapter): adapters.attach checks the adapter against the layers' shapes and builds each
        part's side path; each layer's QKV, o_proj, gate/up and down gets the Side of its adapted parts."""
        from ..kernels.linear import LoRA
        if mode == "merge":
            raise TinyhunError("device 'cuda': an adapter added to a model already on the GPU runs as a side path "
                               "(adapter_mode='side'); to merge it, load with tinyhun.load(path, device='cuda', "
                               "adapter=DIR, adapter_mode='merge')")
        H, shape = cfg.hidden_size, self.k_ref.shape

        def parts(lw):
            attn = Attention(*(Shaped(s) for s in ((cfg.q_dim, H), (cfg.kv_dim, H), (cfg.kv_dim, H),
                                                   (H, cfg.q_dim))), None, None)
            if isinstance(lw.mlp, CudaMoE):
                return Layer(None, attn, None, MoEMLP(*[None] * len(MoEMLP._fields)))
            I = shape(lw.mlp.down)[1]
            return Layer(None, attn, None, DenseMLP(Shaped((I, H)), Shaped((I, H)), Shaped((H, I))))

        def adapt(base, lins, interleave=False):
            sides = [self.k_ref.side_of(lin) if isinstance(lin, LoRA) else None for lin in lins]
            if all(s is None for s in sides):
                return base
            if isinstance(base, self.k_ref.Adapted):
                raise TinyhunError("device 'cuda': this model already has an adapter on the GPU; add adapters to "
                                   "the base model (one side path per linear)")
            side = self.k_ref.join_sides(sides, [lin.shape[0] for lin in lins], self.k_ref.joiner(interleave))
            return self.k_ref.Adapted(base, self._linear(side))
        tuned = attach(Weights(None, tuple(parts(lw) for lw in weights.layers), None, None), cfg, adapter, "side")
        layers = []
        for lw, t in zip(weights.layers, tuned.layers):
            a, m = t.attn, t.mlp
            new = dict(qkv=adapt(lw.qkv, [a.wq, a.wk, a.wv]), wo=adapt(lw.wo, [a.wo]))
            if isinstance(m, DenseMLP):
                gate_up, down = adapt(lw.mlp.gate_up, [m.gate, m.up], True), adapt(lw.mlp.down, [m.down])
                if gate_up is not lw.mlp.gate_up or down is not lw.mlp.down:
                    new["mlp"] = CudaDense(gate_up, down)
            layers.append(lw._replace(**new))
        return weights._replace(layers=tuple(layers))

    def prepare(self, weights):
        if isinstance(weights, CudaWeights):   # already on the device (an adapter added by attach)
            return weights
        fmt, stack = self.k_ref.device_format, self.k_ref.stack
        layers = []
        for i, lw in enumerate(weights.layers):
            a = lw.attn
            norms = [self._put(n) if n.size else n for n in (a.q_norm, a.k_norm)]
            layers.append(CudaLayer(self._put(lw.attn_norm), self._linear(stack([fmt(a.wq), fmt(a.wk), fmt(a.wv)])),
                                    self._linear(fmt(a.wo)), *norms, self._put(lw.mlp_norm), self._mlp(i, lw.mlp)))
        embed = self._linear(fmt(weights.embed))
        head = embed if weights.lm_head is weights.embed else self._linear(fmt(weights.lm_head))
        return CudaWeights(embed, tuple(layers), self._put(weights.norm), head)

    def rope_tables(self, cfg, n):
        return tuple(self._put(t) for t in rope_table(cfg, n))

    def embed(self, out, table, ids):
        self.k_linear.embed_rows(out, table, ids)   # ids: on the device already (DeviceScratch.rows)

    def layer(self, family):
        from ..families import llama
        if family.decoder_layer is not llama.decoder_layer:
            raise TinyhunError(f"device 'cuda': model family {family.MODEL_TYPE!r} is not supported on the GPU yet "
                               "(supported: llama, hunyuan_v1_dense, hunyuan_v1_moe)")
        linear, rope_qk_store, attention_rows = (self.k_linear.linear, self.k_attn.rope_qk_store,
                                                 self.k_attn.attention_rows)
        km, width = self.k_moe, self.k_ref.shape

        def moe_mlp(s, m, norm, eps):
            # the router, the picked experts' gate/up and their weighted downs + residual (module docstring); a
            # shared MLP kept apart reads x before any of the downs add to it
            r, ex, T = s.moe, m.experts, s.x.shape[0]
            ids, weights = r.ids[:T * ex.topk], r.weights[:T * ex.topk]
            km.route(ids, weights, s.x, m.router, norm, eps)
            h = r.h_rows(T, ex.topk + ex.shared, width(ex.down)[1])
            km.experts_up(h, s.x, ex, ids, norm, eps, r)
            if m.apart is not None:
                linear(s.h, s.x, m.apart.gate_up, norm=norm, eps=eps, pairs=True)
                linear(s.x, s.h, m.apart.down, resid=s.x)
            km.experts_down(s.x, h, ex, ids, weights, s.x, r)
            if m.counting[0]:   # routing statistics (tinyhun.moe_stats): the ids come down only while counting
                np.add.at(m.load, ids.copy_to_host(), 1)

        def decoder_layer(lw, s, kv, rows, dims):
            # llama.decoder_layer's block order in six launches, or a mixture of experts' (module docstring); kv:
            # this layer's kernels.kv.KVBlocks on the device
            eps, m, side = dims.eps, lw.mlp, s.side
            linear(s.qkv, s.x, lw.qkv, norm=lw.attn_norm, eps=eps, side=side)
            rope_qk_store(s.q, s.qkv, kv, rows.cos, rows.sin, rows.tables, rows.slots, rows.positions, lw.q_norm,
                          lw.k_norm, eps)
            attention_rows(s.attn, s.q, kv, rows.tables, rows.slots, rows.positions, partials=s.part)
            linear(s.x, s.attn2, lw.wo, resid=s.x, side=side)
            if isinstance(m, CudaMoE):
                moe_mlp(s, m, lw.mlp_norm, eps)
            else:
                linear(s.h, s.x, m.gate_up, norm=lw.mlp_norm, eps=eps, pairs=True, side=side)
                linear(s.x, s.h, m.down, resid=s.x, side=side)
        return decoder_layer

    def logits(self):
        linear = self.k_linear.linear

        def logits(out, x, norm, lm_head, xn, acts, eps):
            linear(out, x, lm_head, norm=norm, eps=eps)
        return logits

    def first_run(self):
        return _Quiet()
