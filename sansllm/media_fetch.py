"""The runtime's media fetcher: answers the core's `protocol.outputs.Fetch` (the core does no IO).

Each `MediaRequest` gets one `MediaFetched` or one `MediaFetchFailed` whose message is fit for the
client's 400: a bad, forbidden, slow or oversized URL is a value here, never an exception. Written on
anyio + httpx so the asyncio and trio runtimes share it.

Lifetime: a `MediaFetcher` holds one `httpx.AsyncClient` (a connection pool), created on first use
inside the running event loop and bound to it. Create one fetcher per `serve()` and
`await fetcher.aclose()` before that loop ends; using it from a second event loop is a RuntimeError.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit
from urllib.request import url2pathname

import anyio
import httpx
from anyio.lowlevel import RunVar

from protocol.media.fetch import FetchResult, MediaFetched, MediaFetchFailed, MediaRequest
from protocol.media.spec import Modality

logger = logging.getLogger(__name__)

# OpenAI caps an image at 20 MB and an audio upload at 25 MB; 64 MiB leaves room for short video
# clips while bounding what one item may hold in memory (max_concurrency items at once per call).
DEFAULT_MAX_BYTES = 64 << 20
TIMEOUT_ENV: dict[str, str] = {
    "image": "VLLM_IMAGE_FETCH_TIMEOUT",
    "video": "VLLM_VIDEO_FETCH_TIMEOUT",
    "audio": "VLLM_AUDIO_FETCH_TIMEOUT",
}
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_SCHEMES_HINT = "use http://, https://, file:// (with --allowed-local-media-path) or a data: URL"


def _domain(host: str) -> str:
    return host.strip().lower().rstrip(".")


@dataclass(frozen=True, kw_only=True)
class FetchLimits:
    """What the fetcher may fetch and how much: vLLM's media flags and env variables.

    `allowed_domains`: `--allowed-media-domains`, exact hostnames (case and a trailing dot ignored);
    None allows any host, an empty set none. Checked again at every redirect hop.
    `allowed_local_path`: `--allowed-local-media-path`; file:// URLs only when set, and only for
    regular files inside it once symlinks and `..` are resolved.
    `max_bytes`: per item, on the decoded body (Content-Length is checked first when sent).
    Timeouts (seconds) bound a whole item: connect, redirects, headers and body, or a file read.
    `max_concurrency`: items fetched at once within one `fetch` call.
    """

    allowed_domains: frozenset[str] | None = None
    allowed_local_path: Path | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    image_timeout: float = 5.0
    video_timeout: float = 30.0
    audio_timeout: float = 10.0
    max_redirects: int = 5
    max_concurrency: int = 8

    def __post_init__(self) -> None:
        if self.allowed_domains is not None:
            domains: Iterable[str] = self.allowed_domains
            object.__setattr__(self, "allowed_domains", frozenset(_domain(d) for d in domains))
        if self.allowed_local_path is not None:
            object.__setattr__(self, "allowed_local_path", Path(self.allowed_local_path))
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {self.max_bytes}")
        for kind in TIMEOUT_ENV:
            if not getattr(self, f"{kind}_timeout") > 0:
                raise ValueError(f"{kind}_timeout must be positive, got {getattr(self, f'{kind}_timeout')}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be 0 or more, got {self.max_redirects}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> FetchLimits:
        """Timeouts from `VLLM_{IMAGE,VIDEO,AUDIO}_FETCH_TIMEOUT` (seconds) as vLLM users set them;
        keyword `overrides` (the flags) win. A malformed value is a ValueError naming the variable."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for kind, name in TIMEOUT_ENV.items():
            raw = environ.get(name, "").strip()
            if not raw:
                continue
            try:
                seconds = float(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
            if not seconds > 0:
                raise ValueError(f"{name}={raw!r} must be a positive number of seconds")
            values[f"{kind}_timeout"] = seconds
        return replace(cls(), **{**values, **overrides})

    def timeout(self, kind: Modality) -> float:
        return getattr(self, f"{kind}_timeout")


class _Failed(Exception):
    """One item cannot be fetched; the message goes to the client as it is."""


def short_url(url: str | httpx.URL, limit: int = 120) -> str:
    """The URL for messages and logs: no user:password, no query (signed URLs carry tokens there)."""
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:
        parts = None
    if parts is not None and parts.scheme and parts.netloc:
        host = parts.netloc.rpartition("@")[2]
        text = f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _user_agent() -> str:
    try:
        return f"sansllm/{version('sansllm')}"
    except PackageNotFoundError:
        return "sansllm/0.0.0"


class MediaFetcher:
    """Fetches media URLs under `FetchLimits`; `fetch` is the function the ASGI shell calls for a Fetch."""

    def __init__(self, limits: FetchLimits | None = None) -> None:
        self.limits = limits or FetchLimits()
        self._client: httpx.AsyncClient | None = None
        self._owner = object()  # marks, in the loop's RunVar, the loop that owns `_client`
        self._loop = RunVar[object | None](f"sansllm.media_fetch.{id(self)}", default=None)

    async def __aenter__(self) -> MediaFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (in the loop that used it); a later `fetch` opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def fetch(self, requests: Sequence[MediaRequest]) -> list[FetchResult]:
        """Fetch all requests concurrently; one result per request, in request order."""
        if self._client is not None and self._loop.get() is not self._owner:
            raise RuntimeError(
                "MediaFetcher used from a second event loop: create one per serve() and aclose() it there"
            )
        results: list[FetchResult | None] = [None] * len(requests)
        limiter = anyio.CapacityLimiter(self.limits.max_concurrency)

        async def one(index: int, request: MediaRequest) -> None:
            async with limiter:
                results[index] = await self._fetch_one(request)

        async with anyio.create_task_group() as group:
            for index, request in enumerate(requests):
                group.start_soon(one, index, request)
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    async def _fetch_one(self, request: MediaRequest) -> FetchResult:
        url, seconds = request.url, self.limits.timeout(request.kind)
        logger.debug("fetching %s %s", request.kind, short_url(url))
        try:
            with anyio.fail_after(seconds):
                data, content_type = await self._get(url)
        except TimeoutError:
            message = (
                f"Timed out after {seconds:g} s fetching '{short_url(url)}' "
                f"(the {request.kind} fetch limit, {TIMEOUT_ENV[request.kind]})"
            )
        except _Failed as failure:
            message = str(failure)
        except Exception:  # a bug must not become a 500 for the whole request
            logger.warning("unexpected error fetching %s", short_url(url), exc_info=True)
            message = f"Could not fetch '{short_url(url)}': unexpected error (see the server log)"
        else:
            logger.debug("fetched %s: %d bytes, %s", short_url(url), len(data), content_type)
            return MediaFetched(request.key, data, content_type)
        logger.info("media fetch failed: %s", message)
        return MediaFetchFailed(request.key, message)

    async def _get(self, url: str) -> tuple[bytes, str | None]:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
        except ValueError as error:
            raise _Failed(f"'{short_url(url)}' is not a valid URL: {error}") from None
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            return await self._get_http(url)
        if scheme == "file":
            return await self._read_file(url, parts)
        if not scheme:
            raise _Failed(f"'{short_url(url)}' is not a URL: {_SCHEMES_HINT}")
        raise _Failed(f"Unsupported URL scheme '{scheme}' in '{short_url(url)}': {_SCHEMES_HINT}")

    # -- http(s) ---------------------------------------------------------------------------------

    def _client_here(self) -> httpx.AsyncClient:
        if self._client is None:
            # trust_env=False: the URLs come from clients, so no .netrc credentials for them and no
            # proxy from the environment (HTTP(S)_PROXY usually meant for model downloads).
            # identity encoding: media is compressed already, and max_bytes then bounds the wire too.
            self._client = httpx.AsyncClient(
                trust_env=False,
                follow_redirects=False,
                timeout=None,  # anyio.fail_after bounds each whole item instead
                headers={"User-Agent": _user_agent(), "Accept-Encoding": "identity"},
            )
            self._loop.set(self._owner)
        return self._client

    def _check_target(self, target: httpx.URL, original: str, hops: int) -> None:
        via = f"'{short_url(original)}' redirected to '{short_url(target)}'"
        if target.scheme not in ("http", "https"):
            raise _Failed(f"{via}: only http:// and https:// redirects are followed")
        host = _domain(target.host)
        if not host:
            raise _Failed(f"{via}, which has no host" if hops else f"'{short_url(original)}' has no host")
        allowed = self.limits.allowed_domains
        if allowed is not None and host not in allowed:
            listed = ", ".join(repr(d) for d in sorted(allowed)[:10]) or "none"
            if hops:
                raise _Failed(f"{via}, whose domain '{host}' is not in --allowed-media-domains ({listed})")
            raise _Failed(
                f"The URL's domain '{host}' is not in --allowed-media-domains ({listed}): "
                f"'{short_url(original)}'"
            )

    async def _get_http(self, url: str) -> tuple[bytes, str | None]:
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as error:
            raise _Failed(f"'{short_url(url)}' is not a valid URL: {error}") from None
        client = self._client_here()
        for hops in range(self.limits.max_redirects + 1):
            self._check_target(target, url, hops)
            where = f"'{short_url(url)}'" + (f" (redirected to '{short_url(target)}')" if hops else "")
            try:
                async with client.stream("GET", target) as response:
                    if response.status_code in _REDIRECT_CODES:
                        location = response.headers.get("location")
                        if not location:
                            raise _Failed(f"HTTP {response.status_code} without a Location fetching {where}")
                        try:
                            target = target.join(location)
                        except (httpx.InvalidURL, ValueError) as error:
                            raise _Failed(f"{where} redirected to an invalid URL: {error}") from None
                        continue
                    if not response.is_success:
                        reason = f" {response.reason_phrase}" if response.reason_phrase else ""
                        raise _Failed(f"HTTP {response.status_code}{reason} fetching {where}")
                    data = await self._read_body(response, where)
                    return data, response.headers.get("content-type")
            except httpx.ConnectError as error:
                raise _Failed(f"Could not connect to '{target.host}' fetching {where}: {error}") from None
            except (httpx.HTTPError, httpx.InvalidURL) as error:
                detail = str(error) or type(error).__name__
                raise _Failed(f"The connection failed fetching {where}: {detail}") from None
        raise _Failed(
            f"Too many redirects (more than {self.limits.max_redirects}) fetching '{short_url(url)}'; "
            f"the last pointed to '{short_url(target)}'"
        )

    async def _read_body(self, response: httpx.Response, where: str) -> bytes:
        limit = self.limits.max_bytes
        declared = response.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            raise _Failed(
                f"The media at {where} is {int(declared)} bytes, larger than the limit of {limit} bytes"
            )
        body = bytearray()
        chunks = response.aiter_bytes()
        async for chunk in chunks:
            body += chunk
            if len(body) > limit:
                break
        else:
            return bytes(body)
        # Stop reading: close the connection, then let the next read fail at the bottom of httpx's
        # chain of async generators so that all of them finish (left to the GC, trio warns about
        # each: httpx issue #3686).
        await response.aclose()
        with contextlib.suppress(httpx.HTTPError):
            async for _ in chunks:
                pass
        raise _Failed(f"The media at {where} is larger than the limit of {limit} bytes")

    # -- file:// ---------------------------------------------------------------------------------

    async def _read_file(self, url: str, parts: SplitResult) -> tuple[bytes, str | None]:
        root = self.limits.allowed_local_path
        if root is None:
            raise _Failed(f"file:// URLs need --allowed-local-media-path on the server: '{short_url(url)}'")
        if parts.netloc not in ("", "localhost"):
            raise _Failed(f"'{short_url(url)}' names host '{parts.netloc}': use file:///path for local files")
        path = Path(url2pathname(parts.path))
        # abandon_on_cancel: a hung disk read cannot block the timeout; the thread reads at most max_bytes+1.
        return await anyio.to_thread.run_sync(
            _read_local, url, path, root, self.limits.max_bytes, abandon_on_cancel=True
        )


def _read_local(url: str, path: Path, root: Path, limit: int) -> tuple[bytes, str | None]:
    """Blocking: resolve, check containment, then read a regular file of at most `limit` bytes."""
    shown = short_url(url)
    if not path.is_absolute():
        raise _Failed(f"'{shown}' is not an absolute file path")
    try:
        real_root, real = root.resolve(), path.resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
        raise _Failed(f"Cannot resolve '{shown}': {error}") from None
    if real != real_root and real_root not in real.parents:
        # said before any existence check: no probing of files outside the allowed folder
        raise _Failed(f"'{shown}' is outside --allowed-local-media-path ('{root}')")
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise _Failed(f"'{shown}' is not a regular file")
        # O_NONBLOCK: a FIFO swapped in after the stat must not hang the open; O_NOFOLLOW: nor a link
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise _Failed(f"No such file: '{shown}'") from None
    except (OSError, ValueError) as error:
        raise _Failed(f"Cannot read '{shown}': {getattr(error, 'strerror', None) or error}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _Failed(f"'{shown}' is not a regular file")
        if info.st_size > limit:
            raise _Failed(
                f"The media at '{shown}' is {info.st_size} bytes, larger than the limit of {limit} bytes"
            )
        data = file.read(limit + 1)
    if len(data) > limit:
        raise _Failed(f"The media at '{shown}' is larger than the limit of {limit} bytes")
    return data, mimetypes.guess_type(real.name)[0]
