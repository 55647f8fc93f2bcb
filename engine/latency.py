"""Request latencies as the engine sees them, for vLLM's histograms.

The engine thread stamps a request when it arrives, when it is first scheduled, at each step that
gives a sample tokens, and when its last sample finishes, and hands the intervals to an observer
(`sansllm.metrics` records them in Prometheus histograms). Measured here rather than in the HTTP
layer because only the engine knows when a step produced a token; one clock read per step.
"""

from __future__ import annotations

from typing import Protocol


class LatencyObserver(Protocol):
    """Called on the engine thread; each call must be cheap (a histogram observation)."""

    def queue_time(self, seconds: float) -> None:
        """From arrival (a structured-output request's guide compile included) to first scheduled."""

    def time_to_first_token(self, seconds: float) -> None:
        """From arrival to the request's first generated token."""

    def inter_token(self, seconds: float) -> None:
        """Between two steps that gave one sample tokens (several after speculative verification)."""

    def end_to_end(self, seconds: float) -> None:
        """From arrival to the request's last sample finishing."""
