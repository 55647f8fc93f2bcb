"""A call whose prompt holds media: first its bytes (fetched by the runtime), then the real call.

The prompt's text, tokens and placeholder positions are known when the request arrives; only the
media's bytes may be elsewhere. So this call asks the runtime to fetch them (`Fetch`), has what
it is fed back decoded off the event loop (a `DeferredCall`: decoding large images takes a while),
and then becomes the call it was built for (`build(media)`), which submits the engine work. Anything wrong with a medium is a 400 naming its part, sent before any engine work,
with the response headers every answer to the request carries (X-Request-Id, CORS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from protocol.calls.base import Call, Headers
from protocol.calls.deferred import DeferredCall
from protocol.engine_api import Command, Event, MediaInput
from protocol.media.fetch import MediaFetched, MediaFetchFailed
from protocol.media.resolve import MediaPlan
from protocol.outputs import Computed, Fetch, Output


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
        return self._decode(())

    def feed(self, events: Sequence[Event | MediaFetched | MediaFetchFailed | Computed]) -> list[Output]:
        if self._inner is not None:
            return self._inner.feed(events)
        if not self._waiting:
            return []
        self._waiting = False
        fetched = [event for event in events if isinstance(event, (MediaFetched, MediaFetchFailed))]
        return self._decode(fetched)

    def _decode(self, fetched: Sequence[MediaFetched | MediaFetchFailed]) -> list[Output]:
        plan = self._plan
        self._inner = DeferredCall(lambda: plan.resolve(fetched), self._build, self.model, self._headers)
        return self._inner.start()

    def disconnected(self) -> list[Command]:
        return self._inner.disconnected() if self._inner is not None else []

    @property
    def finished(self) -> bool:
        return self._inner.finished if self._inner is not None else False
