"""The step logic of an encoder model (BERT family): admit `Encode`s, batch whole inputs, emit `Pooled`.

An encoder attends both ways over its whole input, so an input is never chunked and no KV cache is
kept: each step takes waiting inputs by (priority, arrival) while they fit in the token budget
(always at least one, so an input longer than the budget still runs, alone) and runs them in one
padding-free batch. Same interface as `engine.core.EngineCore`, so one engine thread steps both.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable

import torch

from engine.admission import over_capacity
from engine.core import EngineStats
from engine.model_runner import EncoderInput, EncoderRunner
from engine.requests import RequestRejected, check_media, check_pooling
from protocol.engine_api import Abort, Command, Encode, Event, Failed, Generate, Pooled


class EncoderCore:
    def __init__(
        self,
        runner: EncoderRunner,
        *,
        tasks: frozenset[str],
        vocab_size: int,
        max_model_len: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        hidden_size: int,
        num_type_ids: int = 2,
        max_num_queued_requests: int | None = None,
        max_num_queued_tokens: int | None = None,
    ) -> None:
        self.runner = runner
        self.tasks = tasks
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.hidden_size = hidden_size
        self.num_type_ids = num_type_ids
        self.max_num_queued_requests = max_num_queued_requests
        self.max_num_queued_tokens = max_num_queued_tokens
        self._waiting: list[tuple[int, int, Encode]] = []
        self._live: set[str] = set()  # request ids waiting (aborted ones leave the heap lazily)
        self._arrivals = itertools.count()
        self._prompt_tokens_total = 0
        self._stats = EngineStats()

    @property
    def has_work(self) -> bool:
        return bool(self._live)

    def stats(self) -> EngineStats:
        return self._stats

    def add(self, commands: Iterable[Command]) -> list[Event]:
        events: list[Event] = []
        for command in commands:
            if isinstance(command, Encode):
                events.extend(self._add_encode(command))
            elif isinstance(command, Generate):
                events.append(Failed(command.request_id, 400, "this model does not generate text"))
            elif isinstance(command, Abort):
                self._live.discard(command.request_id)
        self._refresh_stats()
        return events

    def _add_encode(self, command: Encode) -> list[Event]:
        if command.request_id in self._live:
            return [Failed(command.request_id, 400, f"request id {command.request_id!r} is already running")]
        try:
            check_pooling(command, self.tasks, self.vocab_size, self.max_model_len, self.hidden_size)
            check_media(command.prompt_token_ids, command.media, None)  # encoders read text only
            types = command.token_type_ids
            if types is not None and any(not 0 <= t < self.num_type_ids for t in types):
                raise RequestRejected(f"token_type_ids must lie in [0, {self.num_type_ids})")
        except RequestRejected as error:
            return [Failed(command.request_id, error.status, str(error))]
        refusal = over_capacity(
            len(self._live),
            sum(len(c.prompt_token_ids) for _, _, c in self._waiting if c.request_id in self._live),
            len(command.prompt_token_ids),
            max_num_queued_requests=self.max_num_queued_requests,
            max_num_queued_tokens=self.max_num_queued_tokens,
        )
        if refusal is not None:
            return [Failed(command.request_id, 503, refusal)]
        self._live.add(command.request_id)
        heapq.heappush(self._waiting, (command.priority, next(self._arrivals), command))
        return []

    def fail_all(self, status: int, message: str) -> list[Event]:
        events: list[Event] = [Failed(request_id, status, message) for request_id in sorted(self._live)]
        self._live.clear()
        self._waiting.clear()
        self._refresh_stats()
        return events

    def step(self) -> list[Event]:
        batch = self._take_batch()
        events: list[Event] = []
        if batch:
            with torch.inference_mode():
                outputs = self.runner.run(
                    [EncoderInput(c.prompt_token_ids, c.token_type_ids, c.params) for c in batch]
                )
            for command, output in zip(batch, outputs, strict=True):
                self._prompt_tokens_total += len(command.prompt_token_ids)
                data = output.tolist()
                events.append(
                    Pooled(
                        command.request_id,
                        tuple(map(tuple, data)) if output.dim() == 2 else tuple(data),
                        len(command.prompt_token_ids),
                    )
                )
        self._refresh_stats()
        return events

    def _take_batch(self) -> list[Encode]:
        batch: list[Encode] = []
        tokens = 0
        while self._waiting and len(batch) < self.max_num_seqs:
            command = self._waiting[0][2]
            if command.request_id not in self._live:
                heapq.heappop(self._waiting)
                continue
            if batch and tokens + len(command.prompt_token_ids) > self.max_num_batched_tokens:
                break
            heapq.heappop(self._waiting)
            self._live.discard(command.request_id)
            batch.append(command)
            tokens += len(command.prompt_token_ids)
        return batch

    def _refresh_stats(self) -> None:
        self._stats = EngineStats(
            num_waiting=len(self._live), prompt_tokens_total=self._prompt_tokens_total
        )
