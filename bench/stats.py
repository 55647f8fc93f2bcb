"""Per-request timings and the summary numbers every benchmark reports, whatever produced them.

One shape for HF transformers, our engine and HTTP clients, so the ratios compare like with like:
each request records when it was sent and when each piece of output arrived.
"""

from __future__ import annotations

import math

import msgspec


class RequestTiming(msgspec.Struct, kw_only=True):
    """What one request saw. Times are `time.perf_counter()` seconds.

    `chunk_times` holds one entry per arrival of output (an engine step, an SSE chunk, an HF decode
    step); `output_tokens` counts tokens, which may exceed the number of chunks.
    """

    start: float
    chunk_times: list[float] = msgspec.field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def end(self) -> float:
        return self.chunk_times[-1] if self.chunk_times else self.start

    @property
    def ttft(self) -> float | None:
        """Time to first token: queueing + prefill + the first decode."""
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT definition)."""
        if self.output_tokens < 2 or not self.chunk_times:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive arrivals of output (inter-token latency per chunk)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) without pulling numpy into the hot path."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Summary(msgspec.Struct, kw_only=True):
    """Aggregate numbers for one run of a backend over a prompt set."""

    name: str
    requests: int
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int
    elapsed: float
    output_tok_s: float
    tpot_mean: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float


def summarize(name: str, timings: list[RequestTiming], useful_tokens: int | None = None) -> Summary:
    """Aggregate a run. `useful_tokens` overrides the token count used for throughput.

    A static batch that pads short requests up to the longest one generates tokens nobody asked
    for; passing the requested total keeps its throughput honest.
    """
    begin = min(t.start for t in timings)
    finish = max(t.end for t in timings)
    elapsed = finish - begin
    produced = sum(t.output_tokens for t in timings)
    counted = produced if useful_tokens is None else useful_tokens
    ttfts = [t.ttft for t in timings if t.ttft is not None]
    tpots = [t.tpot for t in timings if t.tpot is not None]
    itls = [gap for t in timings for gap in t.itls]
    return Summary(
        name=name,
        requests=len(timings),
        output_tokens=counted,
        prompt_tokens=sum(t.prompt_tokens for t in timings),
        cached_tokens=sum(t.cached_tokens for t in timings),
        elapsed=elapsed,
        output_tok_s=counted / elapsed if elapsed > 0 else math.nan,
        tpot_mean=sum(tpots) / len(tpots) if tpots else math.nan,
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(itls, 50),
        itl_p99=percentile(itls, 99),
    )


def ratio(ours: float, baseline: float) -> float:
    """ours / baseline, NaN when either side is missing or the baseline is zero."""
    if baseline == 0 or math.isnan(ours) or math.isnan(baseline):
        return math.nan
    return ours / baseline
