"""The blocks decoder layers are built from, written once on the op names of tinyhun.kernels.ref / .linear.

Called from Python they run the NumPy references; compiled by Numba (they are `register_jitable`) every op name
resolves to its Numba kernel, so a family's whole layer becomes one Numba call. Each block reads the normed input
from s.xn and leaves its output in s.proj (s: structs.Buffers viewed for T rows).
"""
from numba.extending import register_jitable

from .kernels.linear import linear
from .kernels.ref import attention_rows, rmsnorm, rope, silu_mul, store_kv


@register_jitable
def attention(s, a, k_cache, v_cache, rows, dims):
    # s.proj = o_proj(attention over the cache): a structs.Attention, k_cache/v_cache[B, nkv, S, d] of this layer,
    # rows: structs.Rows (each row's slot, position and RoPE angles), dims: structs.Dims
    T = s.xn.shape[0]
    nh, nkv, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
    linear(s.q, s.xn, a.wq, s.acts)
    linear(s.k, s.xn, a.wk, s.acts)
    linear(s.v, s.xn, a.wv, s.acts)
    q, k, v = s.q.reshape((T, nh, d)), s.k.reshape((T, nkv, d)), s.v.reshape((T, nkv, d))
    rope(q, rows.cos, rows.sin)
    rope(k, rows.cos, rows.sin)
    if a.q_norm.size:   # QK-norm comes after RoPE (Hunyuan; Qwen3 norms before); Llama's weights carry none
        qh, kh = s.q.reshape((T * nh, d)), s.k.reshape((T * nkv, d))   # per head; 2-D: one compiled rmsnorm
        rmsnorm(qh, qh, a.q_norm, dims.eps)
        rmsnorm(kh, kh, a.k_norm, dims.eps)
    store_kv(k_cache, v_cache, k, v, rows.slots, rows.positions)   # keys after RoPE and QK-norm, as transformers
    attention_rows(s.attn.reshape((T, nh, d)), q, k_cache, v_cache, rows.slots, rows.positions)
    linear(s.proj, s.attn, a.wo, s.acts)


@register_jitable
def dense_mlp(s, m):
    # s.proj = down(silu(gate(xn)) * up(xn)): a structs.DenseMLP
    linear(s.gate, s.xn, m.gate, s.acts)
    linear(s.up, s.xn, m.up, s.acts)
    silu_mul(s.gate, s.gate, s.up)
    linear(s.proj, s.gate, m.down, s.acts)


@register_jitable
def logits(out, x, norm, lm_head, xn, acts, eps):
    # out[T, V] = lm_head(rmsnorm(x)), xn[T, H] scratch
    rmsnorm(xn, x, norm, eps)
    linear(out, xn, lm_head, acts)
