"""Whisper's decoding rules, applied to every request of a Whisper model, as transformers'
`generate` applies them (in its order):

1. `begin_suppress_tokens` (a blank and `<|endoftext|>`) are banned at the first generated token;
2. `suppress_tokens` (symbols and specials that never belong in a transcript) always;
3. when the decoder prompt does not end with `<|notimestamps|>`, `WhisperTimeStampLogitsProcessor`'s
   rules: `<|notimestamps|>` itself is banned; timestamps come in pairs (after a pair the next
   token is text, after a lone one another timestamp or the end); they never go back, nor repeat
   the last one except to close a pair; the first token is a timestamp of at most
   `max_initial_timestamp_index` steps; and when the timestamps together are more likely than any
   one text token, a timestamp it is.

The state per sequence is what those rules read of its output: how many tokens, the last two and
the last timestamp. One call handles all its rows with a handful of tensor ops (no loop over the
vocabulary, one log-softmax over the timestamp rows), so it costs little beside the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from engine.processors.base import Admission, LogitsProcessor, RowRef
from engine.whisper_tokens import WhisperDecoding

if TYPE_CHECKING:
    from engine.loader import LoadedModel


@dataclass(frozen=True)
class _Output:
    """What the rules read of a sequence's output so far."""

    timestamps: bool  # the prompt asks for timestamps (it does not end with <|notimestamps|>)
    count: int = 0
    last: int | None = None
    penultimate: int | None = None
    last_timestamp: int | None = None

    def after(self, tokens: Sequence[int], timestamp_begin: int) -> _Output:
        state = self
        for token in tokens:
            stamp = token if token >= timestamp_begin else state.last_timestamp
            state = replace(
                state, count=state.count + 1, last=token, penultimate=state.last, last_timestamp=stamp
            )
        return state


class WhisperRules(LogitsProcessor):
    """The rules above for every admitted sequence (a Whisper model's requests)."""

    def __init__(self, decoding: WhisperDecoding) -> None:
        self.decoding = decoding
        self._outputs: dict[str, _Output] = {}
        self._tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def admit(self, key: str, admission: Admission) -> bool:
        prompt = admission.prompt_token_ids
        timestamps = not (prompt and prompt[-1] == self.decoding.no_timestamps)
        self._outputs[key] = _Output(timestamps)
        return True

    def apply(self, logits: torch.Tensor, rows: Sequence[int], refs: Sequence[RowRef]) -> None:
        d = self.decoding
        states = [self._outputs[ref.key].after(ref.draft, d.timestamp_begin) for ref in refs]
        index = torch.tensor(list(rows), device=logits.device)
        scores = logits[index]
        suppress, begin_suppress = self._suppress_lists(logits.device)
        first = torch.tensor([state.count == 0 for state in states], device=logits.device)
        if begin_suppress.numel():
            scores[:, begin_suppress] = scores[:, begin_suppress].masked_fill(first[:, None], float("-inf"))
        if suppress.numel():
            scores[:, suppress] = float("-inf")
        stamped = [i for i, state in enumerate(states) if state.timestamps]
        if stamped:
            which = torch.tensor(stamped, device=logits.device)
            scores[which] = self._timestamp_rules(scores[which], [states[i] for i in stamped])
        logits[index] = scores

    def _timestamp_rules(self, scores: torch.Tensor, states: Sequence[_Output]) -> torch.Tensor:
        """`WhisperTimeStampLogitsProcessor` over rows `scores` [R, V] (a new tensor)."""
        d = self.decoding
        vocab, begin = scores.shape[1], d.timestamp_begin
        below: list[int] = []  # per row: ban ids < below, stamps < stamp_floor, ids >= above
        stamp_floor: list[int] = []
        above: list[int] = []
        for state in states:
            last_stamp = state.last is not None and state.last >= begin
            penultimate_stamp = state.count < 2 or (
                state.penultimate is not None and state.penultimate >= begin
            )
            floor = begin  # no timestamp is forbidden until one is out
            if state.last_timestamp is not None:  # never back; the same one again only to close a pair
                floor = state.last_timestamp + (0 if last_stamp and not penultimate_stamp else 1)
            ban_below, ban_above = 0, vocab
            if last_stamp and penultimate_stamp:
                floor = vocab  # after a pair (or a first lone timestamp): text
            elif last_stamp:
                ban_below = d.end_of_text  # after a lone one: another timestamp, or the end
            if state.count == 0:  # the first token: a timestamp, not too far in
                ban_below = begin
                if d.max_initial_timestamp_index is not None:
                    ban_above = begin + d.max_initial_timestamp_index + 1
            below.append(ban_below)
            stamp_floor.append(floor)
            above.append(ban_above)
        device = scores.device
        ids = torch.arange(vocab, device=device)

        def column(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=device)[:, None]

        banned = (
            (ids < column(below)) | (ids >= column(above)) | ((ids >= begin) & (ids < column(stamp_floor)))
        )
        banned[:, d.no_timestamps] = True
        scores = scores.masked_fill(banned, float("-inf"))
        # the timestamps' total probability above every text token's: a timestamp it is
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        stamp_logprob = logprobs[:, begin:].logsumexp(dim=-1)
        best_text = logprobs[:, :begin].max(dim=-1).values
        force = (stamp_logprob > best_text)[:, None]
        scores[:, :begin] = scores[:, :begin].masked_fill(force, float("-inf"))
        return scores

    def _suppress_lists(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(suppress_tokens, begin_suppress_tokens) as index tensors on `device`, made once."""
        found = self._tensors.get(device)
        if found is None:
            d = self.decoding
            found = (
                torch.tensor(sorted(set(d.suppress_tokens)), dtype=torch.long, device=device),
                torch.tensor(sorted(set(d.begin_suppress_tokens)), dtype=torch.long, device=device),
            )
            self._tensors[device] = found
        return found

    def accept(self, key: str, token_ids: Sequence[int]) -> None:
        self._outputs[key] = self._outputs[key].after(token_ids, self.decoding.timestamp_begin)

    def fork(self, parent: str, child: str) -> None:
        self._outputs[child] = self._outputs[parent]

    def release(self, key: str) -> None:
        del self._outputs[key]


def whisper_rules(loaded: LoadedModel) -> WhisperRules | None:
    """The rules processor for a loaded Whisper model (None for any other model). The engine puts it
    first in its sampler's pipeline, before the request parameters' processors."""
    decoding = getattr(loaded, "decoding", None)
    return WhisperRules(decoding) if decoding is not None else None
