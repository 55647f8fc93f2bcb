"""The engine-backed call of the pooling endpoints: submit `Encode`s, collect `Pooled`, answer once.

Every pooling endpoint (/v1/embeddings, /pooling, /classify, /score, /rerank) is one `EncodeCall`:
it starts with one `Submit` of all its `Encode`s, waits for exactly one `Pooled` per request id,
and then answers one body, built by the endpoint's `reply` from the results in submission order
(`encode_call` builds the call: input i is engine request `f"{response_id}{engine_tag}-{i}"`).
Nothing is sent before that, so a `Failed` keeps its real status (the other requests are
aborted); a disconnect aborts the requests still running; a bug while building the body is a
500, never an exception out of `feed`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.calls.base import JSON_CONTENT_TYPE, CallIdentity, EngineCall, Headers, retry_after
from protocol.calls.pooling_inputs import EngineInput
from protocol.engine_api import Abort, Encode, Event, Failed, Pooled, PoolingParams
from protocol.errors import ProtocolError
from protocol.outputs import Output, Submit, whole_response
from protocol.pooling_responses import (
    ClassificationResponse,
    EmbeddingResponse,
    PoolingResponse,
    ScoreResponse,
    pooling_usage,
)
from protocol.responses import encode as encode_json

# the answers shaped `{id, object: "list", created, model, data, usage}`
ListResponse = EmbeddingResponse | PoolingResponse | ClassificationResponse | ScoreResponse


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer: content headers (content-type, ...) and the body."""

    headers: Headers
    body: bytes


ReplyBuilder = Callable[[Sequence[Pooled]], Reply]


def prompt_tokens(results: Sequence[Pooled]) -> int:
    return sum(result.num_prompt_tokens for result in results)


@dataclass(frozen=True, slots=True)
class ReplyHead:
    """What a pooling answer names besides its data: its id, creation time and model."""

    response_id: str
    created: int
    model: str

    def list_reply(self, response: type[ListResponse], data: list[Any], results: Sequence[Pooled]) -> Reply:
        """A JSON `response` of `data`, usage counting the prompt tokens of every result."""
        body = response(
            id=self.response_id,
            created=self.created,
            model=self.model,
            data=data,
            usage=pooling_usage(prompt_tokens(results)),
        )
        return Reply(JSON_CONTENT_TYPE, encode_json(body))


class EncodeCall(EngineCall):
    def __init__(
        self,
        model: str,
        encodes: Sequence[Encode],
        reply: ReplyBuilder,
        *,
        response_id: str,
        headers: Headers = (),
    ) -> None:
        """`reply` gets one `Pooled` per `Encode`, in the order of `encodes`."""
        self.model = model
        self.response_id = response_id
        self.encodes = tuple(encodes)
        self._reply = reply
        self._extra_headers = headers
        self._results: dict[str, Pooled] = {}
        self._pending = {encode.request_id for encode in self.encodes}
        self._done = False

    # ---- the Call interface ----

    def start(self) -> list[Output]:
        return [Submit(self.encodes)]

    # ---- events ----

    def _on_event(self, event: Event) -> list[Output]:
        if event.request_id not in self._pending:
            return []  # not ours, or already answered
        if isinstance(event, Failed):
            self._pending.discard(event.request_id)
            return self._fail(ProtocolError(event.message, status=event.status), event.request_id)
        if not isinstance(event, Pooled):
            return []
        self._pending.discard(event.request_id)
        self._results[event.request_id] = event
        if self._pending:
            return []
        return self._complete()

    def _complete(self) -> list[Output]:
        try:
            reply = self._reply([self._results[encode.request_id] for encode in self.encodes])
        except ProtocolError as error:
            return self._fail(error, None)
        self._done = True
        return list(whole_response(200, reply.headers + self._extra_headers, reply.body))

    def _fail(self, error: ProtocolError, failed_request_id: str | None) -> list[Output]:
        self._done = True
        outputs: list[Output] = []
        aborts = self._aborts(exclude=failed_request_id)
        if aborts:
            outputs.append(Submit(tuple(aborts)))
        headers = JSON_CONTENT_TYPE + self._extra_headers + retry_after(error.status)
        outputs += whole_response(error.status, headers, error.to_json())
        return outputs

    def _aborts(self, exclude: str | None) -> list[Abort]:
        """Aborts for the requests the engine may still be running, in submission order."""
        return [
            Abort(encode.request_id)
            for encode in self.encodes
            if encode.request_id in self._pending and encode.request_id != exclude
        ]


def encode_call(
    head: ReplyHead,
    identity: CallIdentity,
    inputs: Sequence[EngineInput],
    params: PoolingParams,
    priority: int,
    reply: ReplyBuilder,
) -> EncodeCall:
    """The call of a pooling endpoint: one `Encode` per input, in order, answered by `reply`."""
    encodes = [
        Encode(
            request_id=identity.engine_request_id(head.response_id, index),
            prompt_token_ids=item.token_ids,
            params=params,
            token_type_ids=item.token_type_ids,
            priority=priority,
            media=item.media,
        )
        for index, item in enumerate(inputs)
    ]
    return EncodeCall(head.model, encodes, reply, response_id=head.response_id, headers=identity.headers)
