"""Which decoding sequences get a draft this step, and the counters metrics report.

When to speculate: verifying k drafts costs a step k more rows for every drafted sequence. A
decode step of a few rows is memory-bound (the weights are read once whatever the row count), so
at one or a few streams the extra rows are nearly free and every accepted token is a step saved;
a step of many rows is compute-bound, and there the rows that get rejected are pure loss. So
sequences are drafted only while at most `max_decoding_seqs` decode in the step (default 4; the
GEMV paths of the quantized matmuls stay below 16 rows then, see `kernels/cpu_ops/quant_linear.cpp`).

Seeded sampled sequences are drafted whatever the load: a seeded sequence's output must not
depend on what else shares the batch, and drafting changes how it consumes its generator (its
distribution is exact either way). Their drafts are rare in a busy batch and bounded by k each.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import NgramProposer


class SpecDecodeStats(msgspec.Struct, frozen=True):
    """vLLM's spec_decode counters: drafts made, tokens drafted and accepted, acceptance per position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: tuple[int, ...] = ()

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = NgramProposer(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max
        )
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * config.num_speculative_tokens

    def propose(self, running: Iterable, max_tokens_of) -> dict[str, tuple[int, ...]]:
        """Drafts keyed by seq_id for the decoding sequences among `running` (scheduler Sequences).
        `max_tokens_of(seq)`: the most output tokens the sequence may have (its request's cap)."""
        decoding = [
            s
            for s in running
            if s.num_tokens - s.num_computed_tokens == 1
            and s.params is not None
            and not s.prefill_only
            and not s.params.use_beam_search
        ]
        crowded = len(decoding) > self.config.max_decoding_seqs
        drafts: dict[str, tuple[int, ...]] = {}
        for seq in decoding:
            if crowded and (seq.params.seed is None or seq.params.temperature < 1e-5):
                continue
            # the token after the draft comes too: the output may not pass max_tokens, nor the
            # positions the context window
            limit = min(
                max_tokens_of(seq) - len(seq.output_token_ids) - 1, self.max_model_len - seq.num_tokens
            )
            draft = self.proposer.propose(seq, limit)
            if draft:
                drafts[seq.seq_id] = tuple(draft)
        return drafts

    def record(self, num_drafted: int, num_accepted: int) -> None:
        """Count one verified draft."""
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            self.accepted_per_pos[position] += 1

    def stats(self) -> SpecDecodeStats:
        return SpecDecodeStats(
            self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, tuple(self.accepted_per_pos)
        )
