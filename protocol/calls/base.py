"""The `Call` interface the runtime shell drives, and the calls answered at once (no engine).

A call is an h11-style state machine: `start()` says what to do first, `feed(events)` turns engine
events into output events, `disconnected()` lists the aborts for unfinished engine work. It never
does IO and never raises: failures become OpenAI-shaped error responses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.engine_api import Command, Event
from protocol.errors import ProtocolError
from protocol.outputs import Body, Output, whole_response

logger = logging.getLogger(__name__)

Headers = tuple[tuple[bytes, bytes], ...]

JSON_CONTENT_TYPE: Headers = ((b"content-type", b"application/json"),)


@dataclass(frozen=True, slots=True)
class CallSettings:
    """The server options that shape chat and completion calls (from `AppConfig`)."""

    response_role: str = "assistant"
    max_logprobs: int = 20
    allow_priority: bool = False
    return_tokens_as_token_ids: bool = False
    enable_force_include_usage: bool = False
    enable_prompt_tokens_details: bool = False
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # a name in protocol.output.tool_parsers.TOOL_PARSERS
    reasoning_parser: str | None = None  # a name in protocol.output.reasoning.REASONING_PARSERS


@dataclass(frozen=True, slots=True)
class CallIdentity:
    """The ids, time and id headers of one request's answer, fixed by `App` before a call is built.

    `base_id` is the client's X-Request-Id (or a body's `request_id`), else a fresh id; response
    ids are `f"{prefix}-{base_id}"`, so a client finds its own value in the answer. Engine request
    ids add `engine_tag`, a fresh `-<id>` when the base id came from the client: two clients may
    send the same id at once, and the engine's ids must stay unique (a fresh base id needs no tag).
    """

    base_id: str
    created: int
    headers: Headers = ()  # X-Request-Id, when enabled
    engine_tag: str = ""

    def response_id(self, prefix: str) -> str:
        return f"{prefix}-{self.base_id}"

    def engine_request_id(self, response_id: str, index: int | None = None) -> str:
        """`f"{response_id}{engine_tag}"`, and `-{index}` for calls of one engine request per input."""
        tagged = f"{response_id}{self.engine_tag}"
        return tagged if index is None else f"{tagged}-{index}"


class Call:
    """One HTTP request's state machine. Subclasses override what they need."""

    #: ServedModel.name whose engine receives this call's `Submit` commands (None: no engine).
    model: str | None = None

    def start(self) -> list[Output]:
        raise NotImplementedError

    def feed(self, events: Sequence[Event]) -> list[Output]:
        return []

    def disconnected(self) -> list[Command]:
        return []

    @property
    def finished(self) -> bool:
        raise NotImplementedError



class EngineCall(Call):
    """A call with engine work in flight (generation, pooling): the event loop, aborts on disconnect.

    Subclasses set `response_id` and `_done = False`, and give `_on_event` (one event -> outputs),
    `_fail(error, failed_request_id)` (end the call with an error; sets `_done`) and `_aborts(exclude)`
    (the `Abort`s for their unfinished engine requests). A bug while handling an event ends the call
    with a 500 instead of escaping into the runtime.
    """

    response_id: str
    _done: bool

    def feed(self, events: Sequence[Event]) -> list[Output]:
        outputs: list[Output] = []
        for event in events:
            if self._done:
                break
            try:
                outputs.extend(self._on_event(event))
            except Exception as exc:  # a bug in the core: answer it, never let it escape
                logger.exception("failed while handling engine events of %s", self.response_id)
                outputs.extend(self._fail(internal_error(exc), None))
        return coalesce(outputs)

    def disconnected(self) -> list[Command]:
        if self._done:
            return []
        self._done = True
        return list(self._aborts(exclude=None))

    @property
    def finished(self) -> bool:
        return self._done

    def _on_event(self, event: Event) -> list[Output]:
        raise NotImplementedError

    def _fail(self, error: ProtocolError, failed_request_id: str | None) -> list[Output]:
        raise NotImplementedError

    def _aborts(self, exclude: str | None) -> Sequence[Command]:
        raise NotImplementedError


def coalesce(outputs: list[Output]) -> list[Output]:
    """Merge neighbouring `Body` outputs: frames produced together go out in one write."""
    merged: list[Output] = []
    for output in outputs:
        if isinstance(output, Body) and merged and isinstance(merged[-1], Body):
            merged[-1] = Body(merged[-1].data + output.data)
        else:
            merged.append(output)
    return merged

class ImmediateCall(Call):
    """A response known when the request arrives: errors, /v1/models, /tokenize, /health, ..."""

    def __init__(self, status: int, body: bytes = b"", headers: Headers = ()) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self._started = False

    def start(self) -> list[Output]:
        self._started = True
        return list(whole_response(self.status, tuple(self.headers), self.body))

    @property
    def finished(self) -> bool:
        return self._started


def json_call(body: bytes, status: int = 200, extra_headers: Headers = ()) -> ImmediateCall:
    return ImmediateCall(status, body, JSON_CONTENT_TYPE + extra_headers)


RETRY_AFTER_SECONDS = b"1"


def retry_after(status: int) -> Headers:
    """`Retry-After` for a 503 (over capacity, engine restarting): clients and proxies back off and retry."""
    return ((b"retry-after", RETRY_AFTER_SECONDS),) if status == 503 else ()


def error_call(error: ProtocolError, extra_headers: Headers = ()) -> ImmediateCall:
    """An OpenAI-shaped error: `{"error": {message, type, param, code}}` with status == code."""
    return json_call(error.to_json(), error.status, extra_headers + retry_after(error.status))


def internal_error(exc: BaseException) -> ProtocolError:
    """A bug in the core, reported as a 500 with the exception's type (no traceback to clients)."""
    return ProtocolError(f"Internal server error: {type(exc).__name__}: {exc}", status=500)
