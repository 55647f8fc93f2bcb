"""How many prompt tokens a step may prefill beside running decodes, so decodes keep a bounded step time.

Every decoding sequence waits for the whole step it is in. A fixed token budget (vLLM's
`max_num_batched_tokens`) lets a step that prefills 500 prompt tokens beside 32 decodes take
several times as long as a decode-only step, and streams see that as inter-token latency spikes
(1.5 s p99 at 32 streams on an AVX2 CPU). Instead, while decodes run, the prefill share of a step
is sized so that the step is expected to take at most `max_step_ratio` times a decode-only step.

The costs are learned online from the engine's own steps (no tuning per CPU): an exponential
average of the time of decode-only steps, and of the extra time per prefilled token in mixed
steps. With no running decodes, or before anything is learned, the full budget applies.
"""

from __future__ import annotations

# The weight of each new observation in the running averages: recent steps matter most (the
# machine's speed drifts), but one noisy step cannot swing the budget.
_SMOOTHING = 0.2


class StepBudget:
    """Learns step costs and says how many prefill tokens fit beside a step's decodes."""

    def __init__(self, max_tokens: int, max_step_ratio: float, min_prefill_tokens: int = 16) -> None:
        """`max_step_ratio` <= 1 disables the limit (the whole `max_tokens` budget, as vLLM)."""
        self.max_tokens = max_tokens
        self.max_step_ratio = max_step_ratio
        self.min_prefill_tokens = min(min_prefill_tokens, max_tokens)  # prompts always progress
        # A decode-only step, whole: its time is mostly reading the weights and grows slowly with the
        # number of sequences, and that number changes slowly, so the recent steps' time is the estimate.
        self.decode_seconds: float | None = None
        self.prefill_seconds: float | None = None  # the extra time of one prefilled token

    @property
    def enabled(self) -> bool:
        return self.max_step_ratio > 1

    def prefill_tokens(self, num_decodes: int) -> int:
        """Prompt tokens the next step may prefill beside `num_decodes` decoding sequences."""
        room = self.max_tokens - num_decodes
        if not self.enabled or num_decodes == 0 or self.decode_seconds is None or not self.prefill_seconds:
            return max(room, 0)
        allowed = int((self.max_step_ratio - 1) * self.decode_seconds / self.prefill_seconds)
        return max(min(allowed, room), min(self.min_prefill_tokens, room), 0)

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        """Learn from one step: how many decodes and prefilled tokens it ran, and how long it took."""
        if num_decodes and not num_prefill_tokens:
            self.decode_seconds = _average(self.decode_seconds, seconds)
        elif num_prefill_tokens and num_decodes and self.decode_seconds is not None:
            extra = max(seconds - self.decode_seconds, 0.0) / num_prefill_tokens
            self.prefill_seconds = _average(self.prefill_seconds, extra)


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else previous + _SMOOTHING * (value - previous)
