"""`/metrics`: the engines' numbers under vLLM's metric names, so Grafana dashboards built for vLLM
work unchanged.

A prometheus_client collector reads each engine's `stats()` when Prometheus scrapes (a snapshot the
engine thread publishes after every step; reading it takes no lock and no engine time), labelled
`model_name` and `engine` as vLLM labels them. Counters carry vLLM's names with the `_total` that
prometheus_client adds (`vllm:prompt_tokens_total`, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LABELS = ["model_name", "engine"]

# (vLLM's name without the `_total` suffix, EngineStats field, help)
COUNTERS = (
    ("vllm:prompt_tokens", "prompt_tokens_total", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "generation_tokens_total", "Number of generation tokens processed."),
    ("vllm:num_preemptions", "num_preemptions", "Cumulative number of preemptions from the engine."),
    ("vllm:prefix_cache_queries", "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    ("vllm:prefix_cache_hits", "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
    ("vllm:spec_decode_num_drafts", "spec_decode_num_drafts", "Number of spec decoding drafts."),
    ("vllm:spec_decode_num_draft_tokens", "spec_decode_num_draft_tokens", "Number of draft tokens."),
    ("vllm:spec_decode_num_accepted_tokens", "spec_decode_num_accepted_tokens", "Number of accepted tokens."),
)  # fmt: skip
GAUGES = (
    ("vllm:num_requests_running", "num_running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "num_waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "kv_cache_usage", "KV-cache usage. 1 means 100 percent usage."),
)


class EngineStatsCollector(Collector):
    """One sample per metric and model, from `engine.stats()` at scrape time."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        self._engines = engines  # served model name -> engine (anything with stats())

    def collect(self) -> Iterator[Metric]:
        stats = {name: engine.stats() for name, engine in self._engines.items()}
        for metric, field, help_text in GAUGES:
            family = GaugeMetricFamily(metric, help_text, labels=LABELS)
            for name, snapshot in stats.items():
                family.add_metric([name, "0"], float(getattr(snapshot, field, 0)))
            yield family
        for metric, field, help_text in COUNTERS:
            family = CounterMetricFamily(metric, help_text, labels=LABELS)
            for name, snapshot in stats.items():
                family.add_metric([name, "0"], float(getattr(snapshot, field, 0)))
            yield family
        per_position = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.",
            labels=[*LABELS, "position"],
        )
        for name, snapshot in stats.items():
            for position, count in enumerate(getattr(snapshot, "spec_decode_num_accepted_tokens_per_pos", ())):
                per_position.add_metric([name, "0", str(position)], float(count))
        yield per_position


class ServerMetrics:
    """The `protocol.state.ServerState` the served app gets: its own registry (tests and several
    apps in one process never share one), rendered on each scrape."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineStatsCollector(engines))

    def metrics(self) -> bytes:
        return generate_latest(self.registry)
