"""Prometheus metrics of the server: what the HTTP layer observes, and the engine's counters read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from multitoken.serve.engine import Engine

# Seconds: from a few milliseconds (a small model on a GPU) to minutes (a 7B model on a CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EngineCollector:
    """The engine's own counters, read when scraped so the decode loop never waits on metrics."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        e, s = self.engine, self.engine.stats
        yield CounterMetricFamily("multitoken_generated_tokens", "Tokens generated (EOS excluded)", value=s.tokens)
        yield CounterMetricFamily("multitoken_row_forwards", "Forwards counted once per batch row", value=s.forwards)
        yield GaugeMetricFamily("multitoken_tokens_per_forward", "Generated tokens per row forward (tau)",
                                value=s.tokens_per_forward)
        proposed = CounterMetricFamily("multitoken_drafts_proposed", "Drafts verified, by draft position",
                                       labels=["position"])
        accepted = CounterMetricFamily("multitoken_drafts_accepted", "Drafts accepted, by draft position",
                                       labels=["position"])
        rate = GaugeMetricFamily("multitoken_draft_acceptance", "Acceptance rate by draft position",
                                 labels=["position"])
        for j, (p, a, r) in enumerate(zip(s.proposed, s.accepted, s.acceptance)):
            proposed.add_metric([str(j + 1)], p)
            accepted.add_metric([str(j + 1)], a)
            rate.add_metric([str(j + 1)], r)
        yield from (proposed, accepted, rate)
        yield GaugeMetricFamily("multitoken_queue_length", "Completions waiting for a batch row", value=e.queue_length)
        yield GaugeMetricFamily("multitoken_running", "Completions decoding now", value=len(e.running))
        yield GaugeMetricFamily("multitoken_max_batch_size", "Batch rows", value=e.max_batch_size)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.requests = Counter("multitoken_http_requests", "HTTP requests by path and status code",
                                ["path", "status"], registry=self.registry)
        self.time_to_first_token = Histogram("multitoken_time_to_first_token_seconds",
                                             "From a completion request's arrival to its first token",
                                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.time_per_token = Histogram("multitoken_time_per_output_token_seconds",
                                        "Mean time between a completion's tokens after the first",
                                        buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.request_latency = Histogram("multitoken_request_duration_seconds",
                                         "From a completion request's arrival to its last token",
                                         buckets=_LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
