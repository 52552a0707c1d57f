"""The blocks decoder layers are built from, written once on the op names of tinyhun.kernels.ref / .linear.

Called from Python they run the NumPy references; compiled by Numba every op name resolves to its Numba kernel, so a
family's whole layer becomes one Numba call (the Numba backend inlines copies of these blocks into it:
backends/host.py `fused_layer`; as `register_jitable` they also compile where something else calls them). Each block
reads its normed input in s.xn and leaves its output in s.proj (s: structs.Buffers viewed for T rows).
"""
from numba.core.errors import TypingError
from numba.extending import overload, register_jitable

from .kernels.linear import linear
from .kernels.moe import count_experts, moe_decode, moe_prefill, route
from .kernels.ref import attention_rows, rmsnorm, rope, silu_mul, store_kv
from .structs import DenseMLP, MoEMLP


@register_jitable
def attention(s, a, kv, rows, dims):
    # s.proj = o_proj(attention over the cache): a structs.Attention, kv: this layer's kernels.kv.KVBlocks,
    # rows: structs.Rows (each row's sequence, position, RoPE angles and the block tables), dims: structs.Dims
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
    store_kv(kv, k, v, rows.tables, rows.slots, rows.positions)   # keys after RoPE and QK-norm, as transformers
    attention_rows(s.attn.reshape((T, nh, d)), q, kv, rows.tables, rows.slots, rows.positions)
    linear(s.proj, s.attn, a.wo, s.acts)


@register_jitable
def dense_mlp(s, m):
    # s.proj = down(silu(gate(xn)) * up(xn)): a structs.DenseMLP
    linear(s.gate, s.xn, m.gate, s.acts)
    linear(s.up, s.xn, m.up, s.acts)
    silu_mul(s.gate, s.gate, s.up)
    linear(s.proj, s.gate, m.down, s.acts)


@register_jitable
def moe_mlp(s, m):
    # s.proj = shared(xn) + sum over the router's top-k experts of weight * expert(xn): a structs.MoEMLP, its
    # routing scratch in s.moe (structs.MoEScratch). One row (decode) runs the k expert GEMVs together, each
    # expert in its own k-th of the scratch; more rows are grouped by expert, one GEMM per expert that any row picked.
    r = s.moe
    T, H = s.xn.shape
    E, nk, width = m.router.shape[0], T * m.topk, T * m.width
    ids, weights = r.ids[:nk], r.weights[:nk]
    route(ids, weights, r.probs[:T * E], s.xn, m.router)
    if m.has_shared:
        dense_mlp(s, m.shared)
    else:
        s.proj[:] = 0.0
    if T == 1:
        moe_decode(s.proj, s.xn, ids, weights, m.gate, m.up, m.down, r.g[:nk * m.width], r.u[:nk * m.width],
                   r.y[:nk * H], s.acts)
    else:
        moe_prefill(s.proj, s.xn, ids, weights, m.gate, m.up, m.down, r.order[:nk], r.starts[:E + 1], r.xg,
                    r.g[:width], r.u[:width], r.y, s.acts)
    if m.counting[0]:
        count_experts(m.load, ids)


MLPS = {DenseMLP: dense_mlp, MoEMLP: moe_mlp}


def mlp(s, m):
    # s.proj = the layer's MLP block of s.xn, chosen by the type of m (structs.DenseMLP or MoEMLP)
    MLPS[type(m)](s, m)


@overload(mlp)
def _mlp_ov(s, m):
    block = MLPS.get(getattr(m, "instance_class", None))
    if block is None:
        raise TypingError(f"mlp: no block for an MLP of type {m}")
    return block


@register_jitable
def logits(out, x, norm, lm_head, xn, acts, eps):
    # out[T, V] = lm_head(rmsnorm(x)), xn[T, H] scratch
    rmsnorm(xn, x, norm, eps)
    linear(out, xn, lm_head, acts)
