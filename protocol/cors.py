"""CORS as vLLM's server answers it (Starlette's CORSMiddleware under `--allowed-origins`,
`--allowed-methods`, `--allowed-headers`, `--allow-credentials`; defaults: any origin, method and
header, no credentials), so browser clients work against either server the same way.

Pure: request headers in, response headers (or a whole preflight answer) out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Headers = tuple[tuple[bytes, bytes], ...]

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
SAFELISTED_HEADERS = ("Accept", "Accept-Language", "Content-Language", "Content-Type")
PREFLIGHT_MAX_AGE = b"600"


@dataclass(frozen=True)
class CorsPolicy:
    allowed_origins: Sequence[str] = ("*",)
    allowed_methods: Sequence[str] = ("*",)
    allowed_headers: Sequence[str] = ("*",)
    allow_credentials: bool = False

    @property
    def _any_origin(self) -> bool:
        return "*" in self.allowed_origins

    def _origin_allowed(self, origin: str) -> bool:
        return self._any_origin or origin in self.allowed_origins

    def _allow_origin(self, origin: str) -> Headers:
        """`*` when any origin may read and no credentials are sent; else the origin itself."""
        if self._any_origin and not self.allow_credentials:
            headers: Headers = ((b"access-control-allow-origin", b"*"),)
        else:
            headers = ((b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"))
        if self.allow_credentials:
            headers += ((b"access-control-allow-credentials", b"true"),)
        return headers

    def response_headers(self, request_headers: Mapping[bytes, bytes]) -> Headers:
        """Headers for an actual (non-preflight) response: none without an allowed `Origin`."""
        origin = request_headers.get(b"origin")
        if origin is None:
            return ()
        text = origin.decode("latin-1")
        return self._allow_origin(text) if self._origin_allowed(text) else ()

    def preflight(self, request_headers: Mapping[bytes, bytes]) -> tuple[int, bytes, Headers] | None:
        """The answer to a CORS preflight (`OPTIONS` with `Origin` and
        `Access-Control-Request-Method`), or None when the request is no preflight."""
        origin = request_headers.get(b"origin")
        method = request_headers.get(b"access-control-request-method")
        if origin is None or method is None:
            return None
        origin_text = origin.decode("latin-1")
        asked = [h.strip() for h in request_headers.get(b"access-control-request-headers", b"").decode("latin-1").split(",") if h.strip()]
        methods = ALL_METHODS if "*" in self.allowed_methods else tuple(m.upper() for m in self.allowed_methods)
        allowed_headers = {h.lower() for h in (*self.allowed_headers, *SAFELISTED_HEADERS)}
        failures = []
        if not self._origin_allowed(origin_text):
            failures.append("origin")
        if method.decode("latin-1").upper() not in methods:
            failures.append("method")
        if "*" not in self.allowed_headers and any(h.lower() not in allowed_headers for h in asked):
            failures.append("headers")
        if failures:
            return 400, f"Disallowed CORS {', '.join(failures)}".encode(), ((b"content-type", b"text/plain; charset=utf-8"),)
        allow_headers = ", ".join(asked) if "*" in self.allowed_headers else ", ".join(sorted({*self.allowed_headers, *SAFELISTED_HEADERS}))
        headers = self._allow_origin(origin_text) + (
            (b"access-control-allow-methods", ", ".join(methods).encode()),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE),
        )
        if allow_headers:
            headers += ((b"access-control-allow-headers", allow_headers.encode("latin-1")),)
        return 200, b"OK", headers + ((b"content-type", b"text/plain; charset=utf-8"),)
