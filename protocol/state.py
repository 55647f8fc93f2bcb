"""What the core may ask of the server it runs in, as one injected object.

The core does no IO and keeps no clock, so what only the running server knows (its metrics
exposition) reaches it through this object rather than through more keyword arguments. A core
built without one answers `/metrics` with a 404.
"""

from __future__ import annotations

from typing import Protocol

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class ServerState(Protocol):
    def metrics(self) -> bytes:
        """The Prometheus text exposition of the server's metrics, at this moment."""
