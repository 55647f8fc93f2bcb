"""Which decoding sequences get a draft this step, how long, and the counters metrics report.

Verifying j draft tokens adds j rows to a step. Whether that pays depends on the machine: on a GPU
a decode step is memory-bound and a few more rows are nearly free, but on a CPU running the
quantized GEMV the rows cost almost linearly (SmolLM2-135M Q4_1, bfloat16, 1 thread on a 2-core
EPYC at 300 tokens of context: 16, 23, 29, 42 and 95 ms for steps of 1, 2, 3, 5 and 9 rows), so
a draft of 4 must get more than ~1.6 tokens accepted before it saves anything, and a draft that
is mostly rejected makes decoding slower. So the length of each draft is chosen, not fixed:

- the step's cost is learned online as `fixed + per_row x rows` from the engine's own decode-only
  steps (exponentially weighted least squares, as `engine.step_budget` does for prefill);
- each sequence's acceptance rate is estimated from every proposal the proposer made for it,
  drafted or not: the tokens the sequence produced next show how many of the proposal's tokens
  would have been accepted (a greedy row accepts exactly the matching prefix; for a sampled row
  the chance that a draft token is accepted equals the chance the sampler draws it), weighted
  towards recent steps and starting from an optimistic prior, so a sequence that starts (or goes
  back to) copying its context is drafted again;
- the draft length j (0 to the proposal's length) maximises the step's expected tokens per second:
  (R - 1 + 1 + a + ... + a^j) / (base + per_row x j), a the acceptance rate, R the decoding
  sequences, base the step without drafts (so with more sequences a draft must do better to pay).

Before the cost line can be fitted (every step so far had the same rows) proposals are drafted in
full, which gives the fit its points. The line cannot see the jump where the quantized matmuls
leave the GEMV for tiles (~16 rows, ~45 ms fixed on the 2-core CPU): so a step with drafts holds at
most `max_step_rows` rows (default 8; measured with 4 streams and k = 4, 20-row steps made decoding
1.6x slower), and sequences are drafted only while at most `max_decoding_seqs` decode.

Seeded sampled sequences are drafted whatever the load: a seeded sequence's output must not
depend on what else shares the batch, and drafting changes how it consumes its generator (its
distribution is exact either way). For the same reason their draft length depends only on their
own tokens: it is chosen by the same rule against a fixed nominal cost (a row `_SEEDED_ROW_COST` of
a one-row step, about what the 2-core CPU measures: 13.5 ms for one row, 24 for five), not the
learned line or the load. So a seeded sequence whose drafts are mostly rejected stops drafting
(measured at temperature 1.0 with 4 drafted tokens: 0.91x plain decoding when it did not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from weakref import WeakKeyDictionary

import msgspec

from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import NgramProposer
from engine.weighted_line import WeightedLine

_SMOOTHING = 0.05  # weight of each new step in the cost line (as engine.step_budget)
_ACCEPTANCE_DECAY = 0.8  # weight kept by a sequence's past proposals at each new one
_PRIOR_RATE, _PRIOR_WEIGHT = 0.8, 2.0  # optimistic: a new sequence's drafts get tried
_SEEDED_ROW_COST = 0.25  # a draft row's cost for seeded sequences, in one-row steps


class _Acceptance:
    """One sequence's last proposal and its (decayed) record of proposed tokens accepted."""

    __slots__ = ("proposal", "position", "hits", "trials", "__weakref__")

    def __init__(self) -> None:
        self.proposal: list[int] = []
        self.position = 0  # the proposal's first token's position
        self.hits = self.trials = 0.0

    def learn(self, seq) -> None:
        """Score the last proposal against the tokens the sequence produced since."""
        if not self.proposal or seq.num_tokens <= self.position:
            return
        produced = seq.token_ids(self.position, min(seq.num_tokens, self.position + len(self.proposal)))
        matched = 0
        while matched < len(produced) and produced[matched] == self.proposal[matched]:
            matched += 1
        tried = matched + (1 if matched < len(produced) else 0)
        self.hits = self.hits * _ACCEPTANCE_DECAY + matched
        self.trials = self.trials * _ACCEPTANCE_DECAY + tried
        self.proposal = []

    @property
    def rate(self) -> float:
        return (self.hits + _PRIOR_RATE * _PRIOR_WEIGHT) / (self.trials + _PRIOR_WEIGHT)


def best_draft_length(available: int, rate: float, base: float, per_row: float, others: int = 0) -> int:
    """The j in 0..available maximising the step's expected tokens per second: this sequence's
    1 + rate + ... + rate^j plus the `others` tokens the rest of the step yields, over its time."""
    best, best_value = 0, (1.0 + others) / base
    expected, term = 1.0 + others, 1.0
    for j in range(1, available + 1):
        term *= rate
        expected += term
        value = expected / (base + per_row * j)
        if value > best_value:
            best, best_value = j, value
    return best


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
        self.step_costs = WeightedLine(_SMOOTHING)  # decode-only step seconds against rows
        self._acceptance: WeakKeyDictionary[object, _Acceptance] = WeakKeyDictionary()

    def propose(self, running: Iterable, max_tokens_of: Callable) -> dict[str, tuple[int, ...]]:
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
        line = self.step_costs.fit()
        rows_left = self.config.max_step_rows - len(decoding)
        drafts: dict[str, tuple[int, ...]] = {}
        for seq in decoding:
            acceptance = self._acceptance.get(seq)
            if acceptance is None:
                acceptance = self._acceptance[seq] = _Acceptance()
            acceptance.learn(seq)
            seeded = seq.params.seed is not None and seq.params.temperature >= 1e-5
            if crowded and not seeded:
                continue
            # the token after the draft comes too: the output may not pass max_tokens, nor the
            # positions the context window
            limit = min(
                max_tokens_of(seq) - len(seq.output_token_ids) - 1, self.max_model_len - seq.num_tokens
            )
            if not seeded:
                limit = min(limit, rows_left)
            proposal = self.proposer.propose(seq, limit)
            if not proposal:
                continue
            acceptance.proposal, acceptance.position = proposal, seq.num_tokens
            length = len(proposal)
            if seeded:
                length = best_draft_length(length, acceptance.rate, 1.0, _SEEDED_ROW_COST)
            elif line is not None:
                fixed, per_row = line
                base = fixed + per_row * len(decoding)
                length = best_draft_length(length, acceptance.rate, base, per_row, len(decoding) - 1)
            if length:
                drafts[seq.seq_id] = tuple(proposal[:length])
                rows_left -= 0 if seeded else length
        return drafts

    def observe(self, rows: int, seconds: float) -> None:
        """A decode-only step of `rows` rows (drafts included) took `seconds`."""
        self.step_costs.add(rows, seconds)

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
