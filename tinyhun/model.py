"""The decoder: Hunyuan dense V1 and Llama share it (Llama is Hunyuan without the QK-norm).

One `forward(state, ids)` serves prefill and decode alike: it runs up to `state.chunk` tokens at positions
state.pos.. through every layer, appending their keys and values to the preallocated KV cache.
"""
import numpy as np

from .errors import TinyhunError


def rope_tables(cfg, n):
    """cos/sin [n, d/2] in float32, as transformers computes them (fp32 inv_freq, fp32 angles)."""
    d = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    angles = np.arange(n, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return np.cos(angles), np.sin(angles)


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
        self.qkv = np.zeros((chunk, cfg.q_dim + 2 * cfg.kv_dim), f32)
        self.attn = np.zeros((chunk, cfg.q_dim), f32)
        self.proj = np.zeros((chunk, H), f32)                         # a sublayer's output before the residual add
        self.gate_up = np.zeros((chunk, 2 * cfg.intermediate_size), f32)
        self.act = np.zeros((chunk, cfg.intermediate_size), f32)
        self.logits = np.zeros((1, cfg.vocab_size), f32)

    def reset(self):
        self.pos = 0


class Model:
    def __init__(self, config, weights, tokenizer=None, kernels=None, max_context=None):
        from . import kernels as default_kernels   # late: tinyhun.kernels is a package-dir mapping
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.k = kernels or default_kernels.select()
        self.max_context = max_context or min(config.max_position_embeddings, 4096)
        self.cos, self.sin = rope_tables(config, self.max_context)

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
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x, xn = state.x[:T], state.xn[:T]
        qkv, attn, proj = state.qkv[:T], state.attn[:T], state.proj[:T]
        gate_up, act = state.gate_up[:T], state.act[:T]
        q = qkv[:, :cfg.q_dim].reshape(T, nh, d)
        kk = qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim].reshape(T, nkv, d)
        v = qkv[:, cfg.q_dim + cfg.kv_dim:].reshape(T, nkv, d)
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
        I = cfg.intermediate_size
        eps = cfg.rms_norm_eps

        x[:] = w.embed[ids]
        for li, lw in enumerate(w.layers):
            k.rmsnorm(xn, x, lw.attn_norm, eps)
            k.matmul(qkv, xn, lw.wqkv)
            k.rope(q, cos, sin)
            k.rope(kk, cos, sin)
            if cfg.qk_norm:   # Hunyuan normalises after RoPE (the reverse of Qwen3)
                k.rmsnorm(q, q, lw.q_norm, eps)
                k.rmsnorm(kk, kk, lw.k_norm, eps)
            kc, vc = state.k_cache[li], state.v_cache[li]
            kc[:, pos:pos + T] = kk.transpose(1, 0, 2)
            vc[:, pos:pos + T] = v.transpose(1, 0, 2)
            k.attention(attn.reshape(T, nh, d), q, kc, vc, pos)
            k.matmul(proj, attn, lw.wo)
            k.add(x, x, proj)

            k.rmsnorm(xn, x, lw.mlp_norm, eps)
            k.matmul(gate_up, xn, lw.w_gate_up)
            k.silu_mul(act, gate_up[:, :I], gate_up[:, I:])
            k.matmul(proj, act, lw.w_down)
            k.add(x, x, proj)
        state.pos = pos + T

        if out is not None:
            k.rmsnorm(xn, x, w.norm, eps)
            k.matmul(out, xn, w.lm_head)
            return out
        last = xn[T - 1:T]
        k.rmsnorm(last, x[T - 1:T], w.norm, eps)
        k.matmul(state.logits, last, w.lm_head)
        return state.logits
