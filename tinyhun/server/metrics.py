"""The server's Prometheus metrics (GET /metrics), in a registry of its own so that two apps in one process
(tests) do not share counters."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine_state):
        """engine_state(): {gauge name: value} of the engine (Engine.state), or None while the model loads."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tinyhun_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("tinyhun_prompt_tokens", "prompt tokens of generation requests", registry=r)
        self.cached_tokens = Counter("tinyhun_cached_prompt_tokens",
                                     "prompt tokens reused from a slot's KV cache (not computed)", registry=r)
        self.completion_tokens = Counter("tinyhun_completion_tokens", "tokens generated", registry=r)
        self.rejected = Counter("tinyhun_rejected", "requests refused with 429 (slots and queue full)", registry=r)
        self.cancelled = Counter("tinyhun_cancelled", "generations stopped because the client went away",
                                 registry=r)
        self.latency = Histogram("tinyhun_request_seconds", "generation request latency, end to end",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tinyhun_time_to_first_token_seconds", "time from request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self._gauges = {name: Gauge(f"tinyhun_{name}", doc, registry=r) for name, doc in GAUGES.items()}
        self._ready = Gauge("tinyhun_ready", "1 once the model is loaded", registry=r)
        self._engine_state = engine_state

    def render(self):
        state = self._engine_state()
        self._ready.set(state is not None)
        for name, value in (state or {}).items():
            self._gauges[name].set(value)
        return generate_latest(self.registry)


GAUGES = {"queue_depth": "requests waiting for a slot or for KV memory",
          "busy_slots": "sequence slots generating",
          "slots": "sequence slots",
          "kv_blocks": "KV cache blocks in the pool",
          "kv_blocks_used": "KV cache blocks held by sequences",
          "kv_blocks_cached": "KV cache blocks held by no sequence that keep a prompt prefix for reuse",
          "kv_blocks_free": "KV cache blocks free or cached (cached ones are evicted when needed)",
          "kv_block_tokens": "tokens per KV cache block",
          "prefix_hit_rate": "share of prompt tokens found in the KV cache (shared prefix blocks), since start",
          "preempted": "sequences preempted for KV memory (and resumed later), since start"}
