"""What a `Call` asks its runtime to do, as small value events (h11 style: events out, no IO).

A runtime loop handles them in order: `StartResponse` commits the HTTP status and headers (sent
only once the status is known, so an early failure keeps its real 4xx/5xx), `Body` is bytes to
write (a JSON body or SSE frames), `EndResponse` closes the response, `Submit` hands commands to
the engine (the runtime must route the engine's events for the submitted request ids back to
`Call.feed`), `Fetch` asks it for media (fed back as `protocol.media.fetch.FetchResult`s), and
`Compute` asks it to run a request's CPU-heavy pure work (decoding an upload) away from the event
loop, fed back as `Computed`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.engine_api import Command
from protocol.media.fetch import MediaRequest


class StartResponse(msgspec.Struct, frozen=True):
    status: int
    headers: tuple[tuple[bytes, bytes], ...]


class Body(msgspec.Struct, frozen=True):
    data: bytes


class EndResponse(msgspec.Struct, frozen=True):
    pass


class Submit(msgspec.Struct, frozen=True):
    commands: tuple[Command, ...]


class Fetch(msgspec.Struct, frozen=True):
    """Fetch these media URLs and feed the results back to the call (one per request, any order)."""

    requests: tuple[MediaRequest, ...]


class Compute(msgspec.Struct, frozen=True):
    """Run `work()` where it does not hold up the event loop and feed back its `Computed`.

    Why: decoding an image or an hour of audio takes from milliseconds to seconds of one request's
    CPU time; on the loop it would stall every other request's stream for as long. `work` is pure
    (no IO, no shared state), so any thread may run it; a runtime without threads (tests,
    fuzzers) runs it in place (`compute_inline`)."""

    work: Any  # Callable[[], Any]


class Computed(msgspec.Struct, frozen=True):
    """What `Compute.work()` returned, or the exception it raised."""

    value: Any = None
    error: Any = None  # BaseException | None


def compute_inline(compute: Compute) -> Computed:
    """Run a `Compute` here and now (what a runtime does on its worker thread)."""
    try:
        return Computed(compute.work())
    except Exception as exc:  # handed to the call, which answers it (a 400, or a 500 for a bug)
        return Computed(error=exc)


Output = StartResponse | Body | EndResponse | Submit | Fetch | Compute


def whole_response(
    status: int, headers: tuple[tuple[bytes, bytes], ...], body: bytes
) -> list[StartResponse | Body | EndResponse]:
    """A response whose body is known before it starts: sent with its `Content-Length`, so it does
    not go out chunked (proxies and clients that read the length before the body want it)."""
    length = (b"content-length", str(len(body)).encode())
    return [StartResponse(status, (*headers, length)), *([Body(body)] if body else []), EndResponse()]
