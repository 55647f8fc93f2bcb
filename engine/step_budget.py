"""How many prompt tokens a step may prefill beside running decodes, so decodes keep a bounded step time.

Every decoding sequence waits for the whole step it is in. A fixed token budget (vLLM's
`max_num_batched_tokens`) lets a step that prefills 500 prompt tokens beside 32 decodes take
several times as long as a decode-only step, and streams see that as inter-token latency spikes
(1.5 s p99 at 32 streams on an AVX2 CPU). Instead, while decodes run, the prefill share of a step
is sized so that the step is expected to take at most `max_step_ratio` times a decode-only step.

The costs are learned online from the engine's own steps (no tuning per CPU): an exponential
average of the time of decode-only steps, and of the extra time per prefilled token in mixed
steps. With no running decodes, or before anything is learned, the full budget applies.

A bound alone starves prefill when prompts arrive faster than it lets them in: sequences queue,
fewer of them decode at a time, and each step carries fewer tokens for the same fixed cost
(measured: ratio 2.5 alone cost 29% of throughput at 32 streams). So the prefill share is also at
least the backlog of prompt tokens spread over the next `DRAIN_STEPS` steps: in a steady stream of
arrivals every step prefills about what arrives per step, and steps stay alike (the p99 of the
inter-token latency is then close to its p50) with no loss of throughput; a burst of prompts is
still taken in full-budget steps.
"""

from __future__ import annotations

# The weight of each new observation in the running averages: recent steps matter most (the
# machine's speed drifts), but one noisy step cannot swing the budget.
_SMOOTHING = 0.2

# Steps over which the prompt tokens waiting to be prefilled are spread (see the module docstring).
DRAIN_STEPS = 4


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

    def prefill_tokens(self, num_decodes: int, backlog: int = 0) -> int:
        """Prompt tokens the next step may prefill beside `num_decodes` decoding sequences, while
        `backlog` prompt tokens wait to be prefilled (running prefills and waiting prompts)."""
        room = self.max_tokens - num_decodes
        if not self.enabled or num_decodes == 0 or self.decode_seconds is None or not self.prefill_seconds:
            return max(room, 0)
        bounded = int((self.max_step_ratio - 1) * self.decode_seconds / self.prefill_seconds)
        draining = -(-backlog // DRAIN_STEPS)
        return max(min(max(bounded, draining), room), min(self.min_prefill_tokens, room), 0)

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        """Learn from one step: how many decodes and prefilled tokens it ran, and how long it took."""
        if num_decodes and not num_prefill_tokens:
            self.decode_seconds = _average(self.decode_seconds, seconds)
        elif num_prefill_tokens and num_decodes and self.decode_seconds is not None:
            extra = max(seconds - self.decode_seconds, 0.0) / num_prefill_tokens
            self.prefill_seconds = _average(self.prefill_seconds, extra)


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else previous + _SMOOTHING * (value - previous)
