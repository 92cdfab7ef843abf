"""Prometheus metrics of one server, in a registry of its own.

A registry per app (not prometheus_client's global one) lets several apps live in one process, as
tests do, without "duplicated timeseries" errors. The engine's queue gauges are read from
`engine.stats()` when the metrics are scraped, so they are never stale and cost nothing in between.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "internlm_fast_"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# A token every few ms on a GPU, every ~100 ms for a large model on a CPU; a first token can wait
# seconds in the queue.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

ENGINE_GAUGES = {
    "running": "Sequences being generated",
    "waiting": "Sequences waiting for a slot",
    "cache_blocks_used": "KV cache blocks in use",
    "cache_blocks_cached": "KV cache blocks kept for prefix reuse",
    "cache_blocks_total": "KV cache blocks in all",
}


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self.stats()
        except Exception:
            # a scrape must not fail because the engine is shutting down; the gauges are just absent
            return
        for key, doc in ENGINE_GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(PREFIX + key, doc, value=float(stats[key]))


class Metrics:
    """The counters and histograms the HTTP layer updates, plus the engine's gauges at scrape time."""

    def __init__(self, engine_stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            PREFIX + "requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=reg
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens submitted", registry=reg)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=reg)
        self.finished = Counter(
            PREFIX + "sequences_finished", "Generated sequences by finish reason", ["finish_reason"], registry=reg
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from submitting a sequence to its first token",
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Seconds between consecutive tokens of a sequence",
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.request_latency = Histogram(
            PREFIX + "request_latency_seconds",
            "Seconds from submitting a sequence to its last token",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        reg.register(_EngineCollector(engine_stats))

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
