"""Mixture-of-experts ops, NumPy references (tinyhun.kernels.moe_cpu: the Numba versions, same signatures).

Routing follows transformers 5 (HunYuanMoEV1Gate / HunYuanMoEV1Experts), where public ports disagree in two places:
the top-k weights are renormalised to sum 1 (one port skips it), and there is no expert capacity (Tencent's older
code dropped a prefill's tokens beyond an expert's capacity): every token reaches its k experts. Equal probabilities
go to the lowest expert index first (torch.topk documents no order for ties), so routing is deterministic.

The E experts of a layer are one linear (tinyhun.kernels.linear) whose arrays carry a leading expert axis
(`stack_linears`); `expert(stack, e)` views expert e without copying, so an expert no row picks is never read.
Routing outputs are flat (row t's j-th choice at t * k + j): T and k are read from the arrays' sizes.
"""
import numpy as np

from .errors import TinyhunError
from .linear import linear
from .ref import silu_mul


def stack_linears(linears):
    """One linear of a layer's experts: each array field stacked along a new leading axis (a field that is the
    same array as an earlier one, as a symmetric Q4's mins are its scales, stays shared). Done once at load."""
    first = linears[0]
    if any(type(w) is not type(first) for w in linears):
        raise TinyhunError(f"experts must share one weight format, got {sorted({type(w).__name__ for w in linears})}")
    fields = []
    for i, v in enumerate(first):
        if isinstance(v, np.ndarray):
            same = next((j for j in range(i) if all(w[j] is w[i] for w in linears)), None)
            fields.append(fields[same] if same is not None else np.stack([w[i] for w in linears]))
        else:
            if any(w[i] != v for w in linears):
                raise TinyhunError(f"experts differ in {type(first).__name__}.{first._fields[i]}")
            fields.append(v)
    return type(first)(*fields)


def expert(stack, e):
    # expert e's linear: a view of each stacked array's slice e
    return type(stack)(*(v[e] if isinstance(v, np.ndarray) else v for v in stack))


def route(ids, weights, probs, x, router):
    # x[T, H], router[E, H] fp32: probs[T E] = softmax(x @ router.T) per row (max subtracted first); ids[T k] the
    # row's k most probable experts, best first (ties: lowest index first), weights[T k] their probabilities / sum
    T, E = x.shape[0], router.shape[0]
    k = ids.size // T
    p = probs.reshape(T, E)
    np.matmul(x, router.T, out=p)
    p -= p.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]   # stable: among equals the lower index comes first
    w = np.take_along_axis(p, top, axis=1)
    ids[:] = top.reshape(-1)
    weights[:] = (w / w.sum(axis=1, keepdims=True)).reshape(-1)
    return ids


def expert_mlp(out, x, gate, up, down, g, u, acts):
    # out[n, H] = down(silu(gate(x)) * up(x)) for x[n, H]; g, u[n, Ie] scratch
    linear(g, x, gate, acts)
    linear(u, x, up, acts)
    silu_mul(g, g, u)
    linear(out, g, down, acts)


def moe_prefill(out, x, ids, weights, gate, up, down, order, starts, xg, g, u, y, acts):
    # out[T, H] += sum_j weights[t k + j] * expert_{ids[t k + j]}(x[t]), gate/up/down the stacked experts: the
    # assignments grouped by expert (order[T k], starts[E + 1]), per expert one GEMM over its gathered rows
    # (xg[T H], g/u[T Ie], y[T H] flat scratch), a weighted scatter-add back. Unpicked experts are skipped.
    T, H = x.shape
    k, E, Ie = ids.size // T, starts.size - 1, g.size // T
    counts = np.bincount(ids, minlength=E)
    starts[0] = 0
    np.cumsum(counts, out=starts[1:])
    order[:] = np.argsort(ids, kind="stable")   # within an expert, rows in order
    for e in range(E):
        lo, hi = starts[e], starts[e + 1]
        n = hi - lo
        if n == 0:
            continue
        a = order[lo:hi]
        rows = a // k
        xe, ye = xg[:n * H].reshape(n, H), y[:n * H].reshape(n, H)
        xe[:] = x[rows]
        expert_mlp(ye, xe, expert(gate, e), expert(up, e), expert(down, e), g[:n * Ie].reshape(n, Ie),
                   u[:n * Ie].reshape(n, Ie), acts)
        np.add.at(out, rows, ye * weights[a][:, None])
    return out


def moe_decode(out, x, ids, weights, gate, up, down, g, u, y, acts):
    # one row: out[1, H] += sum_j weights[j] * expert_{ids[j]}(x[1, H]); g/u[k Ie], y[k H] scratch, expert j's in
    # its j-th slice, acts room for k rows of Ie (the Numba kernel runs the k experts' GEMVs together)
    H, k = x.shape[1], ids.size
    Ie = g.size // k
    for j in range(k):
        e = ids[j]
        ye = y[j * H:(j + 1) * H].reshape(1, H)
        expert_mlp(ye, x, expert(gate, e), expert(up, e), expert(down, e), g[j * Ie:(j + 1) * Ie].reshape(1, Ie),
                   u[j * Ie:(j + 1) * Ie].reshape(1, Ie), acts)
        out += weights[j] * ye
    return out


def count_experts(load, ids):
    # load[e] += how often e occurs in ids
    np.add.at(load, ids, 1)
    return load
