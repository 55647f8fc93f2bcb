"""What the core may ask of the server it runs in.

The core does no IO and keeps no clock, so what only the running server knows reaches it in two
ways: `ServerState`, injected once (its metrics exposition), and `ServerStatus`, the shell's
snapshot handed over with each request (is it healthy, is it draining, how many requests are in
flight). A core built without a `ServerState` answers `/metrics` with a 404.
"""

from __future__ import annotations

import enum
from typing import Protocol

import msgspec

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class ServerState(Protocol):
    def metrics(self) -> bytes:
        """The Prometheus text exposition of the server's metrics, at this moment."""


class Health(enum.Enum):
    """What `/health` says, and whether new work is taken."""

    SERVING = "serving"
    UNHEALTHY = "unhealthy"  # an engine died or is being restarted: /health 503, requests still routed
    DRAINING = "draining"  # shutting down: /health 503, in-flight requests finish, new ones get a 503


class ServerStatus(msgspec.Struct, frozen=True):
    """The shell's state when a request arrives."""

    health: Health = Health.SERVING
    load: int = 0  # engine-backed requests in flight (`GET /load`, with --enable-server-load-tracking)


SERVING = ServerStatus()
