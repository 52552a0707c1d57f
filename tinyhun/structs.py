"""The engine's named structures, defined once: a layer's weights, the run buffers, the rows of a forward pass.

They are NamedTuples, so the NumPy reference reads them as Python objects and Numba compiles them as typed
structs (a field's type is fixed at load time: a linear is F32, Q4 or Q8 from tinyhun.kernels.linear). Shapes:
H hidden, I MLP width, nh/nkv query/key-value heads, d head_dim, R rows of scratch, T rows of one forward.
"""
from typing import NamedTuple

import numpy as np

from .kernels.linear import act_scratch


class Attention(NamedTuple):
    wq: object             # linear [nh d, H]
    wk: object             # linear [nkv d, H]
    wv: object             # linear [nkv d, H]
    wo: object             # linear [H, nh d]
    q_norm: np.ndarray     # [d] per-head RMSNorm of q after RoPE (Hunyuan); [0]: none (Llama)
    k_norm: np.ndarray     # [d] the same for k; [0]: none


class DenseMLP(NamedTuple):
    gate: object           # linear [I, H]
    up: object             # linear [I, H]
    down: object           # linear [H, I]


class MoEMLP(NamedTuple):
    """A mixture of experts (E experts of width Ie, k of them per token) beside a shared MLP."""
    router: np.ndarray     # float32[E, H]: routing stays fp32, as in transformers (never quantized)
    gate: object           # linear of the E experts stacked [E, Ie, H] (kernels.moe.stack_linears)
    up: object             # the same [E, Ie, H]
    down: object           # [E, H, Ie]
    shared: DenseMLP       # always run, added with weight 1; zero-row F32 linears (never read) when has_shared is off
    has_shared: bool
    topk: int              # k
    width: int             # Ie
    load: np.ndarray       # int64[E] tokens routed to each expert while counting (tinyhun.moe_stats)
    counting: np.ndarray   # bool[1], one array per model: whether the forward pass adds to `load`

    @property
    def idle_bytes(self):
        """Bytes of the E - k experts a decoded token does not read."""
        E = self.router.shape[0]
        return (E - self.topk) * sum(w.nbytes for w in (self.gate, self.up, self.down)) // E


class Layer(NamedTuple):
    attn_norm: np.ndarray  # [H]
    attn: Attention
    mlp_norm: np.ndarray   # [H]
    mlp: DenseMLP          # a family with another MLP (mixture of experts) puts its own block type here


class Weights(NamedTuple):
    embed: object          # linear [V, H] (rows are looked up, never multiplied)
    layers: tuple          # Layer per decoder layer
    norm: np.ndarray       # [H] final RMSNorm
    lm_head: object        # linear [V, H]; the embedding itself when tied

    def arrays(self, decode=False):
        """Every weight array once (a tied lm_head counted once); decode=True: what a decoded token reads (all but
        the embedding, of which it reads one row)."""
        return weight_arrays(self, decode, lambda v: isinstance(v, np.ndarray))

    @property
    def nbytes(self):
        """Bytes of all weights held."""
        return sum(a.nbytes for a in self.arrays())

    @property
    def decode_bytes(self):
        """Bytes read per decoded token (of a mixture of experts, only the experts it is routed to)."""
        idle = sum(getattr(layer.mlp, "idle_bytes", 0) for layer in self.layers)
        return sum(a.nbytes for a in self.arrays(decode=True)) - idle


def weight_arrays(w, decode, is_array):
    """The arrays (is_array(leaf)) of a weights tuple with embed/layers/norm/lm_head fields, each once: a host
    structs.Weights or a device backend's own."""
    def walk(v):
        if is_array(v):
            yield v
        elif isinstance(v, tuple):
            for item in v:
                yield from walk(item)
    head = () if w.lm_head is w.embed and not decode else (w.lm_head,)
    found = {id(a): a for a in walk(((() if decode else w.embed), w.layers, w.norm, head))}
    return list(found.values())


class Dims(NamedTuple):
    num_heads: int         # nh
    num_kv_heads: int      # nkv
    head_dim: int          # d
    eps: float             # RMSNorm epsilon


class Rows(NamedTuple):
    """What a forward pass over T rows needs besides the weights: each row is one token of some sequence."""
    slots: np.ndarray      # int64[T] the sequence each row belongs to: its row of `tables`
    positions: np.ndarray  # int64[T] the row's position in its sequence
    cos: np.ndarray        # float32[T, d/2] RoPE angles of each row's position
    sin: np.ndarray        # float32[T, d/2]
    ids: np.ndarray        # int64[T] the row's token id (the embedding reads it)
    tables: np.ndarray     # int32[n, max blocks] each sequence's KV block table (kernels/kv.py)


class Buffers(NamedTuple):
    """Activation scratch for up to R rows, allocated once; `rows(T)` views the first T rows."""
    x: np.ndarray          # [R, H] residual stream
    xn: np.ndarray         # [R, H] normed input of a sublayer
    q: np.ndarray          # [R, nh d]
    k: np.ndarray          # [R, nkv d]
    v: np.ndarray          # [R, nkv d]
    attn: np.ndarray       # [R, nh d]
    proj: np.ndarray       # [R, H] a sublayer's output before the residual add
    gate: np.ndarray       # [R, I]
    up: np.ndarray         # [R, I]
    acts: tuple            # kernels.q4.Q8Acts, flat: int8 activations of quantized matmuls, for the widest input
    moe: tuple = ()        # MoEScratch of a mixture-of-experts family, else empty

    @classmethod
    def allocate(cls, cfg, rows):
        def f(width):
            return np.zeros((rows, width), np.float32)
        H, I = cfg.hidden_size, cfg.intermediate_size
        widest = max(H, cfg.q_dim, I)
        moe, act_rows = (), rows
        if cfg.has_experts:   # its experts' widths may exceed I; decode rounds k experts' inputs
            moe = MoEScratch.allocate(cfg, rows)
            widest = max(widest, *cfg.moe_intermediate_size)
            act_rows = max(rows, *cfg.moe_topk)
        return cls(f(H), f(H), f(cfg.q_dim), f(cfg.kv_dim), f(cfg.kv_dim), f(cfg.q_dim), f(H), f(I), f(I),
                   act_scratch(act_rows, -(-widest // 32) * 32), moe)

    def rows(self, T):
        return Buffers(*(b[:T] if isinstance(b, np.ndarray) else b for b in self))


class MoEScratch(NamedTuple):
    """Routing and dispatch scratch for up to R rows, flat (an op views the first T rows at its layer's E, k, Ie):
    E, k and Ie are the largest over the layers (per-layer configs may vary them)."""
    probs: np.ndarray      # float32[R E] router softmax
    ids: np.ndarray        # int64[R k] each row's experts, best first
    weights: np.ndarray    # float32[R k] their weights, renormalised to sum 1
    order: np.ndarray      # int64[R k] the (row, j) assignments row * k + j, grouped by expert
    starts: np.ndarray     # int64[E + 1] where each expert's group starts in `order`
    xg: np.ndarray         # float32[R H] an expert's input rows, gathered
    g: np.ndarray          # float32[R' Ie] its gate, then silu(gate) * up (R' = max(R, k): decode holds k experts)
    u: np.ndarray          # float32[R' Ie] its up
    y: np.ndarray          # float32[R' H] its output rows

    @classmethod
    def allocate(cls, cfg, rows):
        E, k, W, H = max(cfg.num_experts), max(cfg.moe_topk), max(cfg.moe_intermediate_size), cfg.hidden_size
        f, wide = np.float32, max(rows, k)
        return cls(np.zeros(rows * E, f), np.zeros(rows * k, np.int64), np.zeros(rows * k, f),
                   np.zeros(rows * k, np.int64), np.zeros(E + 1, np.int64), np.zeros(rows * H, f),
                   np.zeros(wide * W, f), np.zeros(wide * W, f), np.zeros(wide * H, f))
