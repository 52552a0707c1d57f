"""Routing statistics of a mixture-of-experts model: tokens routed to each expert of each layer, the share of
experts used at least once, and the share of parameters a token runs through.

Counting is off by default: the forward pass then only tests one flag per layer. `collect(model)` switches it on
for its block; the counters live beside the model's router weights (structs.MoEMLP.load), so forwards run from
several threads at once while collecting may lose increments (counts are exact from one thread).

    with collect(model) as stats:
        ...generate...
    print(format_report(stats.report()))
"""
import math
from contextlib import contextmanager

from .errors import TinyhunError
from .families import family_of


class RoutingStats:
    def __init__(self, model, layers):
        self.model, self.layers = model, layers

    def report(self):
        """{"tokens", "layers": [{"layer", "experts", "topk", "load", "used"}], "experts_used", "active_params",
        "total_params", "active_share"}; `load[e]`: tokens routed to expert e, `used`: share of experts with any."""
        cfg = self.model.config
        total = sum(math.prod(s) for s in family_of(cfg).checkpoint_shapes(cfg).values())
        idle = sum((E - k) * 3 * cfg.hidden_size * Ie
                   for E, k, Ie in zip(cfg.num_experts, cfg.moe_topk, cfg.moe_intermediate_size))
        rows = [{"layer": i, "experts": len(m.load), "topk": m.topk, "load": m.load.tolist(),
                 "used": float((m.load > 0).mean())} for i, m in self.layers]
        experts = sum(r["experts"] for r in rows)
        return {"tokens": int(self.layers[0][1].load.sum()) // self.layers[0][1].topk, "layers": rows,
                "experts_used": sum(r["used"] * r["experts"] for r in rows) / experts,
                "active_params": total - idle, "total_params": total, "active_share": (total - idle) / total}


@contextmanager
def collect(model):
    """Count routing decisions of every forward inside the block (counters zeroed on entry); yields RoutingStats."""
    layers = [(i, layer.mlp) for i, layer in enumerate(model.weights.layers) if hasattr(layer.mlp, "load")]
    if not layers:
        raise TinyhunError(f"routing statistics: {model.config.model_type} has no mixture-of-experts layers")
    for _, m in layers:
        m.load[:] = 0
    switch = layers[0][1].counting
    switch[0] = True
    try:
        yield RoutingStats(model, layers)
    finally:
        switch[0] = False


def format_report(r):
    """A few lines for a terminal: per layer the share of experts used and the tokens each expert received."""
    lines = [f"moe: {r['tokens']} tokens routed; experts used at least once: {100 * r['experts_used']:.1f} %; "
             f"active parameters per token: {r['active_params'] / 1e6:.2f} M of {r['total_params'] / 1e6:.2f} M "
             f"({100 * r['active_share']:.1f} %)"]
    for row in r["layers"]:
        lines.append(f"  layer {row['layer']:>3} (top-{row['topk']} of {row['experts']}): used "
                     f"{100 * row['used']:5.1f} %, tokens per expert {' '.join(map(str, row['load']))}")
    return "\n".join(lines)
