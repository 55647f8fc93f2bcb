"""A replica's `/metrics` registry copied into Ray's metrics, so Ray's Prometheus export shows each
replica's engine numbers (tagged with Ray's deployment, replica and application tags).

Ray exports only metrics made with its own API (`ray.serve.metrics`), and a replica's `/metrics`
is reachable only through whichever replica the router picks, so every `interval` seconds the
replica reads its prometheus_client registry and replays it: gauges are set, counters increase by
what they grew since the last copy, histograms are observed once per new sample at the upper bound
of the bucket it fell in (Ray's boundaries are the same, so the buckets match exactly; the sum is
then an upper bound). Names lose vLLM's `vllm:` prefix for `sansllm_` (Ray exports them as
`ray_sansllm_...`). Ray's metric classes are injected, so this is tested without a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client.registry import Collector

_BUCKET_LABEL = "le"  # a histogram bucket sample's upper bound, not a tag


class MetricFactory(Protocol):
    """`ray.serve.metrics.Counter` / `Gauge` / `Histogram`, as far as this module uses them."""

    def __call__(self, name: str, *, description: str = "", tag_keys: tuple[str, ...] = (), **kwargs: Any) -> Any: ...


def ray_name(name: str) -> str:
    """`vllm:prompt_tokens` -> `sansllm_prompt_tokens`; other names get the prefix too."""
    base = name.split(":", 1)[1] if name.startswith("vllm:") else name
    return "sansllm_" + base.replace(":", "_")


class RegistryExporter:
    """Copies a prometheus_client registry into Ray metrics on each `export()`."""

    def __init__(
        self,
        registry: Collector,
        *,
        counter: MetricFactory,
        gauge: MetricFactory,
        histogram: MetricFactory,
    ) -> None:
        self.registry = registry
        self._factories = {"counter": counter, "gauge": gauge, "histogram": histogram}
        self._metrics: dict[str, Any] = {}
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def export(self) -> None:
        for family in self.registry.collect():
            if family.type == "counter":
                self._counter(family)
            elif family.type == "gauge":
                self._gauge(family)
            elif family.type == "histogram":
                self._histogram(family)

    def _metric(self, kind: str, name: str, description: str, tag_keys: Iterable[str], **kwargs: Any) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            factory: Callable[..., Any] = self._factories[kind]
            metric = factory(name, description=description, tag_keys=tuple(tag_keys), **kwargs)
            self._metrics[name] = metric
        return metric

    def _counter(self, family: Any) -> None:
        for sample in family.samples:
            if not sample.name.endswith("_total"):  # `_created` timestamps
                continue
            tags = _tags(sample.labels)
            metric = self._metric("counter", ray_name(family.name), family.documentation, sample.labels)
            grown = self._grown((sample.name, tags), sample.value)
            if grown > 0:
                metric.inc(grown, tags=dict(tags))

    def _gauge(self, family: Any) -> None:
        for sample in family.samples:
            tags = _tags(sample.labels)
            metric = self._metric("gauge", ray_name(family.name), family.documentation, sample.labels)
            metric.set(sample.value, tags=dict(tags))

    def _histogram(self, family: Any) -> None:
        buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                tags = _tags({k: v for k, v in sample.labels.items() if k != _BUCKET_LABEL})
                buckets.setdefault(tags, []).append((float(sample.labels[_BUCKET_LABEL]), sample.value))
        for tags, cumulative in buckets.items():
            cumulative.sort()
            bounds = [bound for bound, _ in cumulative if not math.isinf(bound)]
            metric = self._metric(
                "histogram", ray_name(family.name), family.documentation, [key for key, _ in tags], boundaries=bounds
            )
            below = 0.0
            for bound, count in cumulative:
                in_bucket = count - below
                below = count
                new = int(self._grown((family.name + "_bucket", (*tags, (_BUCKET_LABEL, str(bound)))), in_bucket))
                value = bound if not math.isinf(bound) else (bounds[-1] * 2 if bounds else 1.0)
                for _ in range(new):
                    metric.observe(value, tags=dict(tags))

    def _grown(self, key: tuple[str, tuple[tuple[str, str], ...]], value: float) -> float:
        """How much a cumulative value grew since the last export (all of it the first time)."""
        last = self._last.get(key, 0.0)
        self._last[key] = value
        return value - last if value >= last else value  # a reset (restarted engine): count afresh


def _tags(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))
