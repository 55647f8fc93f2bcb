"""`/metrics`: the engines' numbers under vLLM's names, as a Prometheus scrape reads them."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from sansllm.metrics import ServerMetrics


def EngineStats(**fields) -> SimpleNamespace:  # noqa: N802 - stands in for engine.core.EngineStats
    """The fields `engine.core.EngineStats` has (the collector reads them by name; missing: 0)."""
    return SimpleNamespace(**fields)


class _Engine:
    def __init__(self, stats: SimpleNamespace) -> None:
        self._stats = stats

    def stats(self) -> SimpleNamespace:
        return self._stats


def scrape(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(metrics.metrics().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_each_model_reports_vllm_metric_names_with_its_label():
    chat = EngineStats(
        num_running=3,
        num_waiting=2,
        kv_cache_usage=0.25,
        num_preemptions=1,
        prefix_cache_queries=100,
        prefix_cache_hits=40,
        prompt_tokens_total=120,
        generation_tokens_total=56,
        spec_decode_num_drafts=4,
        spec_decode_num_draft_tokens=16,
        spec_decode_num_accepted_tokens=9,
        spec_decode_num_accepted_tokens_per_pos=(4, 3, 2),
    )
    samples = scrape(ServerMetrics({"chat": _Engine(chat), "embed": _Engine(EngineStats())}))
    labels = (("engine", "0"), ("model_name", "chat"))
    assert samples[("vllm:num_requests_running", labels)] == 3
    assert samples[("vllm:num_requests_waiting", labels)] == 2
    assert samples[("vllm:kv_cache_usage_perc", labels)] == 0.25
    assert samples[("vllm:prompt_tokens_total", labels)] == 120
    assert samples[("vllm:generation_tokens_total", labels)] == 56
    assert samples[("vllm:num_preemptions_total", labels)] == 1
    assert samples[("vllm:prefix_cache_queries_total", labels)] == 100
    assert samples[("vllm:prefix_cache_hits_total", labels)] == 40
    assert samples[("vllm:spec_decode_num_accepted_tokens_total", labels)] == 9
    assert samples[("vllm:spec_decode_num_accepted_tokens_per_pos_total", tuple(sorted((*labels, ("position", "2")))))] == 2
    assert samples[("vllm:generation_tokens_total", (("engine", "0"), ("model_name", "embed")))] == 0


def test_a_scrape_reads_the_engines_at_that_moment():
    engine = _Engine(EngineStats(num_running=1))
    metrics = ServerMetrics({"m": engine})
    labels = (("engine", "0"), ("model_name", "m"))
    assert scrape(metrics)[("vllm:num_requests_running", labels)] == 1
    engine._stats = EngineStats(num_running=0, generation_tokens_total=7)
    after = scrape(metrics)
    assert after[("vllm:num_requests_running", labels)] == 0
    assert after[("vllm:generation_tokens_total", labels)] == 7


def test_latency_histograms_per_model_with_vllm_names():
    metrics = ServerMetrics({"m": _Engine(EngineStats())})
    observer = metrics.observer("m")
    observer.time_to_first_token(0.03)
    observer.inter_token(0.02)
    observer.inter_token(0.06)
    observer.end_to_end(1.2)
    observer.queue_time(0.001)
    samples = scrape(metrics)
    labels = (("engine", "0"), ("model_name", "m"))
    assert samples[("vllm:time_to_first_token_seconds_count", labels)] == 1
    assert samples[("vllm:inter_token_latency_seconds_count", labels)] == 2
    assert abs(samples[("vllm:inter_token_latency_seconds_sum", labels)] - 0.08) < 1e-9
    assert samples[("vllm:inter_token_latency_seconds_bucket", tuple(sorted((*labels, ("le", "0.05")))))] == 1
    assert samples[("vllm:e2e_request_latency_seconds_count", labels)] == 1
    assert samples[("vllm:request_queue_time_seconds_count", labels)] == 1


def test_http_responses_are_counted_by_route_never_by_raw_path():
    metrics = ServerMetrics({})
    metrics.observe_http("POST", "/v1/chat/completions", 200, 0.2)
    metrics.observe_http("POST", "/v1/chat/completions", 400, 0.01)
    metrics.observe_http("GET", "/v1/models/org/name", 200, 0.001)
    metrics.observe_http("GET", "/wp-admin/../../etc", 404, 0.001)
    samples = scrape(metrics)

    def count(method: str, status: str, handler: str) -> float:
        return samples[("http_requests_total", (("handler", handler), ("method", method), ("status", status)))]

    assert count("POST", "2xx", "/v1/chat/completions") == 1
    assert count("POST", "4xx", "/v1/chat/completions") == 1
    assert count("GET", "2xx", "/v1/models/{model}") == 1
    assert count("GET", "4xx", "other") == 1
    assert samples[("http_request_duration_seconds_count", (("handler", "/v1/chat/completions"), ("method", "POST")))] == 2
