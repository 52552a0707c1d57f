"""The decoder: Hunyuan dense V1 and Llama share it (Llama is Hunyuan without the QK-norm).

One `forward(state, ids)` serves prefill and decode alike: it runs up to `state.chunk` tokens at positions
state.pos.. through every layer, appending their keys and values to the preallocated KV cache.
"""
import numpy as np

from . import kernels as backends
from .errors import TinyhunError


def rope_tables(cfg, n):
    """cos/sin [n, d/2] in float32, as transformers computes them (fp32 inv_freq, fp32 angles)."""
    d = cfg.head_dim
    inv_freq = np.float32(1.0) / (np.float32(cfg.rope_base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    angles = np.arange(n, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles), np.sin(angles)


def embed_rows(out, embed, ids):
    if isinstance(embed, np.ndarray):
        np.take(embed, ids, axis=0, out=out)
    else:   # a quantized (tied) embedding: dequantize just these rows
        from .kernels import q4, q8
        out[:] = (q8 if isinstance(embed, q8.Q8Weight) else q4).dequantize_rows(embed, ids)


def layer_tuple(lw):
    """A layer's weights as the flat tuple kernels.decoder_layer takes (Numba cannot take a dataclass)."""
    none = np.zeros(0, np.float32)    # Llama has no QK-norm
    return (lw.attn_norm, lw.wq, lw.wk, lw.wv, none if lw.q_norm is None else lw.q_norm,
            none if lw.k_norm is None else lw.k_norm, lw.wo, lw.mlp_norm, lw.w_gate, lw.w_up, lw.w_down)


class State:
    """One sequence's KV cache and activation buffers, allocated once (the per-token path allocates nothing large)."""

    def __init__(self, cfg, max_context, chunk=128):
        L, S, d, H = cfg.num_layers, max_context, cfg.head_dim, cfg.hidden_size
        f32 = np.float32
        self.max_context = S
        self.chunk = chunk
        self.pos = 0                                                  # tokens already in the cache
        self.k_cache = np.zeros((L, cfg.num_kv_heads, S, d), f32)    # keys after RoPE (and QK-norm)
        self.v_cache = np.zeros((L, cfg.num_kv_heads, S, d), f32)
        self.x = np.zeros((chunk, H), f32)                            # residual stream
        self.xn = np.zeros((chunk, H), f32)                           # normed input of a sublayer
        self.q = np.zeros((chunk, cfg.q_dim), f32)
        self.k = np.zeros((chunk, cfg.kv_dim), f32)
        self.v = np.zeros((chunk, cfg.kv_dim), f32)
        self.attn = np.zeros((chunk, cfg.q_dim), f32)
        self.proj = np.zeros((chunk, H), f32)                         # a sublayer's output before the residual add
        self.gate = np.zeros((chunk, cfg.intermediate_size), f32)
        self.up = np.zeros((chunk, cfg.intermediate_size), f32)
        self.logits = np.zeros((1, cfg.vocab_size), f32)
        # int8 activations of INT4 matmuls (kernels/q4.py Q8Acts), flat, for the widest matmul input
        widest = chunk * max(H, cfg.q_dim, cfg.intermediate_size)
        self.acts = (np.zeros(widest, np.int8), np.zeros(widest // 32, f32), np.zeros(widest // 32, np.int32),
                     np.zeros(widest // 32, f32))

    def reset(self):
        self.pos = 0

    def buffers(self, T):
        """The scratch a decoder layer uses for T tokens, in kernels.ref.decoder_layer's order."""
        rows = tuple(b[:T] for b in (self.xn, self.q, self.k, self.v, self.attn, self.proj, self.gate, self.up))
        return rows + (self.acts,)


class Model:
    def __init__(self, config, weights, tokenizer=None, kernels=None, max_context=None):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.kernels = kernels or backends.select()
        self.max_context = max_context or min(config.max_position_embeddings, 4096)
        self.cos, self.sin = rope_tables(config, self.max_context)

    @property
    def kernels(self):
        return self.k

    @kernels.setter
    def kernels(self, k):
        """Switch backends (e.g. to the NumPy references); each prepares the layer weights its own way."""
        self.k = k
        self.layer_args = [k.prepare_layer(layer_tuple(lw)) for lw in self.weights.layers]

    def new_state(self, max_context=None, chunk=128):
        max_context = max_context or self.max_context
        if max_context > self.max_context:
            self.max_context = max_context
            self.cos, self.sin = rope_tables(self.config, max_context)
        return State(self.config, max_context, chunk)

    def logits(self, ids):
        """float32 [len(ids), V] logits of every position, from a fresh cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        state = self.new_state(max(len(ids), 1))
        out = np.empty((len(ids), self.config.vocab_size), np.float32)
        for start in range(0, len(ids), state.chunk):
            part = ids[start:start + state.chunk]
            self.forward(state, part, out=out[start:start + len(part)])
        return out

    def forward(self, state, ids, out=None):
        """Run ids (at most state.chunk) at positions state.pos..; return logits [1, V] of the last token,
        or write every position's logits into `out` [len(ids), V]."""
        cfg, k, w = self.config, self.k, self.weights
        T = len(ids)
        if not 0 < T <= state.chunk:
            raise ValueError(f"forward takes 1..{state.chunk} tokens, got {T}")
        pos = state.pos
        if pos + T > state.max_context:
            raise TinyhunError(f"context full: {pos} + {T} tokens exceed max_context {state.max_context}")
        if int(np.min(ids)) < 0 or int(np.max(ids)) >= cfg.vocab_size:
            raise TinyhunError(f"token id out of range [0, {cfg.vocab_size})")
        x = state.x[:T]
        bufs = state.buffers(T)
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
        heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        embed_rows(x, w.embed, ids)
        for li, lw in enumerate(self.layer_args):
            k.decoder_layer(x, bufs, lw, state.k_cache[li], state.v_cache[li], pos, cos, sin, heads, cfg.rms_norm_eps)
        state.pos = pos + T

        xn = bufs[0]
        if out is not None:
            k.rmsnorm(xn, x, w.norm, cfg.rms_norm_eps)
            k.matmul(out, xn, w.lm_head)
            return out
        last = xn[T - 1:T]
        k.rmsnorm(last, x[T - 1:T], w.norm, cfg.rms_norm_eps)
        k.matmul(state.logits, last, w.lm_head)
        return state.logits
