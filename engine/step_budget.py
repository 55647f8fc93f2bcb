"""How many prompt tokens a step may prefill beside running decodes, so decodes keep a bounded step time.

Every decoding sequence waits for the whole step it is in. A fixed token budget (vLLM's
`max_num_batched_tokens`) lets a step that prefills 500 prompt tokens beside 32 decodes take
several times as long as a decode-only step, and streams see that as inter-token latency spikes
(ITL p99 7x its p50 at 32 streams on a 2-core CPU). Instead, while decodes run, the prefill share
of a step is sized so that the step is expected to take at most `max_step_ratio` times a decode
step at the present load: every sequence running or waiting (up to `max_num_seqs`) decoding
together, which is the step time streams see once the prompts in the queue are in. Measuring
against the decodes running now instead starves a burst of arrivals: with 2 of 32 sequences
decoding, a step may take only a few times a 2-row step, a few dozen prompt tokens, and the
queue drains at half the rate a loaded step allows.

The costs are learned online from the engine's own steps (no tuning per CPU):

- A step that prefills is modelled as `fixed + per_token x tokens` (tokens: decode rows plus
  prompt tokens), fitted by exponentially weighted least squares. The fixed part is large on the
  quantized CPU path: past 16 rows the linear layers leave the GEMV for dequantized weight tiles
  and a matmul
  (measured on SmolLM2-135M Q4_1, 2 cores: 45 ms fixed and 0.8 ms a token, while a 4-row
  decode-only step on the GEMV path takes 14 ms). A model of "decode-only time plus a cost per
  prompt token" misses that fixed part, sees each small mixed step as costly per token, and
  starves prefill (measured: half the throughput).
- A decode-only step's time, as a running average: when it is slower than the fitted line at the
  same rows, it is the reference the ratio applies to.

With no running decodes, or before anything is learned, the whole budget applies.

Measured at 32 streams, 192 requests (bench/RESULTS.md): ratio 2.5 holds ITL p99 at 2.5x its p50
(unbounded: 6.4x) for 5% of output tok/s. Spreading the backlog over several smaller steps as well
made steps even more alike but delayed each prompt's first token, and cost 12%.
"""

from __future__ import annotations

from engine.weighted_line import WeightedLine

# The weight of each new observation: recent steps matter most (the machine's speed drifts, the
# number of decoding rows changes), but one noisy step cannot swing the budget.
_SMOOTHING = 0.05


class StepBudget:
    """Learns step costs and says how many prefill tokens fit beside a step's decodes."""

    def __init__(self, max_tokens: int, max_step_ratio: float, min_prefill_tokens: int = 16) -> None:
        """`max_step_ratio` <= 1 disables the limit (the whole `max_tokens` budget, as vLLM)."""
        self.max_tokens = max_tokens
        self.max_step_ratio = max_step_ratio
        self.min_prefill_tokens = min(min_prefill_tokens, max_tokens)  # prompts always progress
        self.decode_seconds: float | None = None  # running average of decode-only steps
        self.prefill_steps = WeightedLine(_SMOOTHING)  # seconds against tokens, steps that prefill

    @property
    def enabled(self) -> bool:
        return self.max_step_ratio > 1

    def prefill_tokens(self, num_decodes: int, load: int = 0) -> int:
        """Prompt tokens the next step may prefill beside `num_decodes` decoding sequences, while
        `load` sequences run or wait."""
        room = max(self.max_tokens - num_decodes, 0)
        line = self.prefill_steps.fit()
        if not self.enabled or num_decodes == 0 or line is None:
            return room
        fixed, per_token = line
        floor = fixed + per_token * num_decodes  # the fitted step with these decodes and no prompt
        reference = max(fixed + per_token * max(num_decodes, load), self.decode_seconds or 0.0)
        bounded = int((self.max_step_ratio * reference - floor) / per_token)
        return max(min(bounded, room), min(self.min_prefill_tokens, room))

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        """Learn from one step: how many decodes and prefilled tokens it ran, and how long it took."""
        if num_prefill_tokens:
            self.prefill_steps.add(num_decodes + num_prefill_tokens, seconds)
        elif num_decodes:
            previous = self.decode_seconds
            self.decode_seconds = seconds if previous is None else previous + _SMOOTHING * (seconds - previous)
