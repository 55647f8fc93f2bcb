"""A call whose prompt holds media: first its bytes (fetched by the runtime), then the real call.

The prompt's text, tokens and placeholder positions are known when the request arrives; only the
media's bytes may be elsewhere. So this call asks the runtime to fetch them (`Fetch`), decodes what
it is fed back, and then becomes the call it was built for (`build(media)`), which submits the
engine work. Anything wrong with a medium is a 400 naming its part, sent before any engine work,
with the response headers every answer to the request carries (X-Request-Id, CORS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from protocol.calls.base import Call, Headers, error_call, internal_error, logger
from protocol.engine_api import Command, Event, MediaInput
from protocol.errors import ProtocolError
from protocol.media.fetch import MediaFetched, MediaFetchFailed
from protocol.media.resolve import MediaPlan
from protocol.outputs import Fetch, Output


class MediaCall(Call):
    """Waits for a prompt's media, then hands over to the call `build` makes with it."""

    def __init__(
        self,
        plan: MediaPlan,
        build: Callable[[tuple[MediaInput, ...]], Call],
        model: str,
        headers: Headers = (),
    ) -> None:
        self.model = model
        self._headers = headers  # for its own errors; the call `build` makes sets its own
        self._plan = plan
        self._build = build
        self._inner: Call | None = None
        self._waiting = False

    def start(self) -> list[Output]:
        requests = self._plan.requests()
        if requests:
            self._waiting = True
            return [Fetch(requests)]
        return self._become(())

    def feed(self, events: Sequence[Event | MediaFetched | MediaFetchFailed]) -> list[Output]:
        if self._inner is not None:
            return self._inner.feed(events)  # type: ignore[arg-type]
        if not self._waiting:
            return []
        self._waiting = False
        fetched = [event for event in events if isinstance(event, (MediaFetched, MediaFetchFailed))]
        return self._become(fetched)

    def _become(self, fetched: Sequence[MediaFetched | MediaFetchFailed]) -> list[Output]:
        try:
            media = self._plan.resolve(fetched)
            self._inner = self._build(media)
        except ProtocolError as error:
            self._inner = error_call(error, self._headers)
        except Exception as exc:  # a bug in the core: answer it, never let it escape
            logger.exception("failed while preparing a prompt's media")
            self._inner = error_call(internal_error(exc), self._headers)
        return self._inner.start()

    def disconnected(self) -> list[Command]:
        return self._inner.disconnected() if self._inner is not None else []

    @property
    def finished(self) -> bool:
        return self._inner.finished if self._inner is not None else False
