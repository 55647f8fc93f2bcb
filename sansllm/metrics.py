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

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protocol.app import ROUTE_PATHS

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


# vLLM's buckets, so dashboards' quantile panels read the same
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)  # fmt: skip


class _Observer:
    """`engine.latency.LatencyObserver` for one model: its children of the histograms."""

    def __init__(self, histograms: dict[str, Histogram], model_name: str) -> None:
        labels = {"model_name": model_name, "engine": "0"}
        self._queue = histograms["queue"].labels(**labels)
        self._ttft = histograms["ttft"].labels(**labels)
        self._itl = histograms["itl"].labels(**labels)
        self._e2e = histograms["e2e"].labels(**labels)

    def queue_time(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def time_to_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def end_to_end(self, seconds: float) -> None:
        self._e2e.observe(seconds)


class ServerMetrics:
    """The `protocol.state.ServerState` the served app gets: its own registry (tests and several
    apps in one process never share one), rendered on each scrape, and the latency histograms each
    engine observes into (`observer(model_name)`)."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineStatsCollector(engines))
        self._histograms = {
            key: Histogram(name, help_text, LABELS, registry=self.registry, buckets=buckets)
            for key, name, help_text, buckets in (
                ("queue", "vllm:request_queue_time_seconds", "Time spent waiting before first scheduled.", _REQUEST_BUCKETS),
                ("ttft", "vllm:time_to_first_token_seconds", "Time to first token in seconds.", _TTFT_BUCKETS),
                ("itl", "vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", _ITL_BUCKETS),
                ("e2e", "vllm:e2e_request_latency_seconds", "End to end request latency in seconds.", _REQUEST_BUCKETS),
            )
        }  # fmt: skip

        # HTTP metrics under the names vLLM's instrumentator uses, by route (never by raw path: an
        # unknown path is "other", so scanners cannot blow up the label set)
        self._http_requests = Counter(
            "http_requests", "Total number of requests by method, status and handler.",
            ["method", "status", "handler"], registry=self.registry,
        )  # fmt: skip
        self._http_duration = Histogram(
            "http_request_duration_seconds", "Latency with only few buckets by handler.",
            ["method", "handler"], registry=self.registry, buckets=(0.1, 0.5, 1.0, 5.0, 30.0, 120.0),
        )  # fmt: skip

    def observe_http(self, method: str, path: str, status: int, seconds: float) -> None:
        """`protocol.asgi.ResponseHook`: one finished HTTP response."""
        handler = path if path in ROUTE_PATHS else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        self._http_requests.labels(method, f"{status // 100}xx", handler).inc()
        self._http_duration.labels(method, handler).observe(seconds)

    def observer(self, model_name: str) -> _Observer:
        return _Observer(self._histograms, model_name)

    def metrics(self) -> bytes:
        return generate_latest(self.registry)
