"""One sample ("choice") of a generation: engine token ids -> text a client may see.

Detokenizes incrementally, applies stop strings (asking for an `Abort` of the sample when one
matches) and records how the sample finished. Chat and completions share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.detokenizer import IncrementalDetokenizer
from protocol.engine_api import TokenLogprobs, Tokens
from protocol.requests import ChatCompletionRequest, CompletionRequest
from protocol.stop import StopMatcher
from protocol.tokenizer import Tokenizer
from protocol.validation import stop_strings


@dataclass(frozen=True, slots=True)
class Step:
    """What one engine event added to a sample."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None
    finished: bool
    stopped_by_string: bool = False  # the caller must abort the sample in the engine


@dataclass(frozen=True, slots=True)
class TextOptions:
    """The request's options on how output text is produced."""

    stop: Sequence[str] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    @classmethod
    def of(cls, request: ChatCompletionRequest | CompletionRequest) -> TextOptions:
        return cls(
            stop=stop_strings(request.stop),
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
        )


class Sample:
    """State of one choice. `discard_output` serves echo-only requests (max_tokens=0)."""

    def __init__(
        self,
        *,
        choice_index: int,
        request_id: str,
        engine_index: int,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        options: TextOptions,
        discard_output: bool = False,
    ) -> None:
        self.choice_index = choice_index
        self.request_id = request_id
        self.engine_index = engine_index
        self.discard_output = discard_output
        self._eos_ids = tokenizer.eos_token_ids
        self._include_stop = options.include_stop_str_in_output
        self._detokenizer = IncrementalDetokenizer(
            tokenizer,
            prompt_token_ids,
            skip_special_tokens=options.skip_special_tokens,
            spaces_between_special_tokens=options.spaces_between_special_tokens,
        )
        self._stop = StopMatcher(options.stop, options.include_stop_str_in_output)
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []  # what the client sees (none for echo-only)
        self._num_tokens = 0
        self.logprobs: list[TokenLogprobs] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def num_tokens(self) -> int:
        """Tokens the engine generated (an echo-only sample's dropped token counts too, as in vLLM)."""
        return self._num_tokens

    def advance(self, event: Tokens) -> Step:
        """Apply one engine event; events after the sample finished are ignored (empty step)."""
        if self.finished:
            return Step("", (), None, finished=False)
        ids = tuple(event.token_ids)
        self._num_tokens += len(ids)
        logprobs = tuple(event.logprobs) if event.logprobs is not None else None
        if self.discard_output:
            self._finish_if(event)
            return Step("", (), None, finished=self.finished)
        self.token_ids.extend(ids)
        if logprobs:
            self.logprobs.extend(logprobs)
        text = self._detokenizer.push(self._visible_ids(ids, event))
        if event.finish_reason is not None:
            text += self._detokenizer.flush()
        released = self._stop.feed(text)
        if self._stop.matched is not None:
            self.finished = True
            self.finish_reason = "stop"
            self.stop_reason = self._stop.matched
            self.text_parts.append(released)
            return Step(released, ids, logprobs, finished=True, stopped_by_string=event.finish_reason is None)
        if event.finish_reason is not None:
            released += self._stop.flush()
            self._finish_if(event)
        self.text_parts.append(released)
        return Step(released, ids, logprobs, finished=self.finished)

    def finish_externally(self, reason: str) -> None:
        """The sample ends for a reason outside the engine's events (e.g. the request failed)."""
        if not self.finished:
            self.finished = True
            self.finish_reason = reason

    def _visible_ids(self, ids: tuple[int, ...], event: Tokens) -> tuple[int, ...]:
        """The EOS or stop token that ended a sample is not part of its text (as vLLM)."""
        if (
            event.finish_reason == "stop"
            and ids
            and not self._include_stop
            and (ids[-1] in self._eos_ids or ids[-1] == event.stop_reason)
        ):
            return ids[:-1]
        return ids

    def _finish_if(self, event: Tokens) -> None:
        if event.finish_reason is not None:
            self.finished = True
            self.finish_reason = event.finish_reason
            self.stop_reason = event.stop_reason
