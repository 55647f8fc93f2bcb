"""A call that needs CPU-heavy pure work before it exists: the work runs off the event loop.

Decoding a request's media (an uploaded recording, a prompt's images) is the core's job and pure,
but long: `DeferredCall` asks its runtime to run it (`Compute`), then becomes the call `build`
makes from the result. A `ProtocolError` from either is the request's 4xx, with the request's
headers; anything else is a bug, answered as a 500.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from protocol.calls.base import Call, Headers, error_call, internal_error, logger
from protocol.engine_api import Command
from protocol.errors import ProtocolError
from protocol.outputs import Compute, Computed, Output


class DeferredCall(Call):
    """Runs `work` through the runtime, then hands over to `build(work())`."""

    def __init__(
        self, work: Callable[[], Any], build: Callable[[Any], Call], model: str | None, headers: Headers = ()
    ) -> None:
        self.model = model
        self._work = work
        self._build = build
        self._headers = headers  # for its own errors; the call `build` makes sets its own
        self._inner: Call | None = None
        self._waiting = False

    def start(self) -> list[Output]:
        self._waiting = True
        return [Compute(self._work)]

    def feed(self, events: Sequence[Any]) -> list[Output]:
        if self._inner is not None:
            return self._inner.feed(events)
        computed = next((event for event in events if isinstance(event, Computed)), None)
        if not self._waiting or computed is None:
            return []
        self._waiting = False
        try:
            if computed.error is not None:
                raise computed.error
            self._inner = self._build(computed.value)
        except ProtocolError as error:
            self._inner = error_call(error, self._headers)
        except Exception as exc:  # a bug in the core: answer it, never let it escape
            logger.error("failed while preparing a request", exc_info=exc)
            self._inner = error_call(internal_error(exc), self._headers)
        return self._inner.start()

    def disconnected(self) -> list[Command]:
        return self._inner.disconnected() if self._inner is not None else []

    @property
    def finished(self) -> bool:
        return self._inner.finished if self._inner is not None else False

