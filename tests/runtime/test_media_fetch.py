"""The media fetcher against a loopback HTTP server and a temporary folder, under asyncio and trio.

The server runs in background threads (`http.server`), so it serves both backends alike; endpoints
that must "never finish" block on an event released at teardown.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import anyio
import pytest

from protocol.media.fetch import MediaFetched, MediaFetchFailed, MediaRequest
from sansllm.media_fetch import DEFAULT_MAX_BYTES, FetchLimits, MediaFetcher, short_url

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)
HUGE = 10_000_000_000


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request) -> str:
    return request.param


class Handler(http.server.BaseHTTPRequestHandler):
    server: MediaServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host"), self.headers.get("User-Agent")))
        path, _, query = self.path.partition("?")
        args = {key: values[0] for key, values in parse_qs(query).items()}
        parts = path.strip("/").split("/")
        route = getattr(self, "route_" + parts[0].replace("-", "_"), None)
        if route is None:
            self.send_error(404)
            return
        try:
            route(*parts[1:], **args)
        except ConnectionError:
            pass  # the fetcher hung up, as it should past a limit

    def head(self, status: int = 200, length: int | None = None, **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def route_png(self) -> None:
        self.head(length=len(PNG), Content_Type="image/png")
        self.wfile.write(PNG)

    def route_bytes(self, count: str) -> None:  # no Content-Length: HTTP/1.0, ends when the connection closes
        self.head()
        self.wfile.write(b"x" * int(count))

    def route_sized(self, count: str) -> None:
        self.head(length=int(count))
        self.wfile.write(b"x" * int(count))

    def route_endless(self) -> None:
        self.head(Content_Type="video/mp4")
        chunk = b"\0" * 65536
        while not self.server.release.is_set():
            self.wfile.write(chunk)

    def route_declared_huge(self) -> None:  # a fetcher that ignored Content-Length would hang here
        self.head(length=HUGE)
        self.wfile.flush()
        self.server.release.wait()

    def route_hang_headers(self) -> None:
        self.server.release.wait()

    def route_hang_body(self) -> None:
        self.head(length=1000)
        self.wfile.write(b"x" * 10)
        self.wfile.flush()
        self.server.release.wait()

    def route_redirect(self, to: str, code: str = "302") -> None:
        self.head(int(code), length=0, Location=to)

    def route_chain(self, count: str) -> None:  # relative Locations: /chain/3 -> chain/2 ... -> /png
        left = int(count)
        self.head(302, length=0, Location=f"/chain/{left - 1}" if left > 1 else "../png")

    def route_loop(self) -> None:
        self.head(301, length=0, Location="/loop")

    def route_no_location(self) -> None:
        self.head(302, length=0)

    def route_barrier(self, name: str) -> None:
        """Answers only once two requests for `name` are in the server at the same time."""
        with self.server.lock:
            barrier = self.server.barriers.setdefault(name, threading.Barrier(2, timeout=10))
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        self.route_png()


class MediaServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[tuple[str, str | None, str | None]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.barriers: dict[str, threading.Barrier] = {}

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def server():
    server = MediaServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


async def fetch_one(url: str, kind: str = "image", **limits) -> MediaFetched | MediaFetchFailed:
    async with MediaFetcher(FetchLimits(**limits)) as fetcher:
        [result] = await fetcher.fetch([MediaRequest(0, url, kind)])
    assert result.key == 0
    return result


async def failure(url: str, kind: str = "image", **limits) -> str:
    result = await fetch_one(url, kind, **limits)
    assert isinstance(result, MediaFetchFailed), result
    return result.message


# -- http ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fetches_bytes_and_content_type_with_our_user_agent(server):
    result = await fetch_one(server.url("/png"))
    assert result == MediaFetched(0, PNG, "image/png")
    assert server.seen[-1][2].startswith("sansllm/")


@pytest.mark.anyio
@pytest.mark.parametrize("concurrency", [1, 8])
async def test_one_result_per_request_in_request_order(server, tmp_path, concurrency):
    requests = [
        MediaRequest(7, server.url("/missing"), "image"),
        MediaRequest(3, server.url("/png"), "image"),
        MediaRequest(5, (tmp_path / "x.png").as_uri(), "image"),
        MediaRequest(1, server.url("/bytes/3"), "audio"),
    ]
    async with MediaFetcher(FetchLimits(max_concurrency=concurrency)) as fetcher:
        results = await fetcher.fetch(requests)
    assert [result.key for result in results] == [7, 3, 5, 1]
    assert [type(result) for result in results] == [
        MediaFetchFailed,
        MediaFetched,
        MediaFetchFailed,
        MediaFetched,
    ]
    assert results[3].data == b"xxx"
    async with MediaFetcher() as fetcher:
        assert await fetcher.fetch([]) == []


@pytest.mark.anyio
async def test_items_are_fetched_concurrently(server, anyio_backend):
    url = server.url(f"/barrier/together-{anyio_backend}")  # answered only once both are in flight
    async with MediaFetcher(FetchLimits(max_concurrency=2)) as fetcher:
        results = await fetcher.fetch([MediaRequest(0, url, "image"), MediaRequest(1, url, "image")])
    assert [result.data for result in results] == [PNG, PNG]


@pytest.mark.anyio
async def test_max_concurrency_holds_back_the_other_items(server, anyio_backend):
    """Had both been sent at once both would pass the barrier; one at a time, the first sent waits
    alone until its timeout, and only then does the other arrive (and meet the abandoned handler).
    Which goes first is the scheduler's choice (trio picks at random)."""
    url = server.url(f"/barrier/apart-{anyio_backend}")
    async with MediaFetcher(FetchLimits(max_concurrency=1, image_timeout=0.3)) as fetcher:
        results = await fetcher.fetch([MediaRequest(0, url, "image"), MediaRequest(1, url, "image")])
    assert [result.key for result in results] == [0, 1]
    [failed] = [result for result in results if isinstance(result, MediaFetchFailed)]
    assert failed.message.startswith("Timed out after 0.3 s")
    [fetched] = [result for result in results if isinstance(result, MediaFetched)]
    assert fetched.data == PNG


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/hang-headers", "/hang-body"])
@pytest.mark.parametrize("kind", ["image", "audio", "video"])
async def test_the_kinds_timeout_bounds_the_whole_fetch(server, path, kind):
    timeouts = {f"{other}_timeout": 60.0 for other in ("image", "audio", "video")}
    timeouts[f"{kind}_timeout"] = 0.3
    with anyio.fail_after(30):  # only a guard: the fetcher's own limit is what ends it
        message = await failure(server.url(path), kind, **timeouts)
    assert message == (
        f"Timed out after 0.3 s fetching '{server.url(path)}' "
        f"(the {kind} fetch limit, VLLM_{kind.upper()}_FETCH_TIMEOUT)"
    )


@pytest.mark.anyio
async def test_a_declared_size_over_the_limit_fails_before_the_body(server):
    with anyio.fail_after(30):  # the endpoint never sends its body: only the header check ends this early
        message = await failure(server.url("/declared-huge"), max_bytes=1000)
    assert message == (
        f"The media at '{server.url('/declared-huge')}' is {HUGE} bytes, larger than the limit of 1000 bytes"
    )


@pytest.mark.anyio
async def test_an_endless_body_stops_past_the_limit(server):
    with anyio.fail_after(30):
        message = await failure(server.url("/endless"), "video", max_bytes=1 << 20)
    assert message == f"The media at '{server.url('/endless')}' is larger than the limit of 1048576 bytes"


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["bytes", "sized"])
async def test_size_limit_is_inclusive(server, route):
    result = await fetch_one(server.url(f"/{route}/1000"), max_bytes=1000)
    assert isinstance(result, MediaFetched) and len(result.data) == 1000
    message = await failure(server.url(f"/{route}/1001"), max_bytes=1000)
    assert "larger than the limit of 1000 bytes" in message


@pytest.mark.anyio
async def test_http_error_status(server):
    message = await failure(server.url("/missing"))
    assert message == f"HTTP 404 Not Found fetching '{server.url('/missing')}'"


@pytest.mark.anyio
async def test_connection_refused(anyio_backend):
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/a.png"
        message = await failure(url)
    assert message.startswith(f"Could not connect to '127.0.0.1' fetching '{url}': ")


@pytest.mark.anyio
async def test_relative_redirects_are_followed_up_to_the_limit(server):
    result = await fetch_one(server.url("/chain/3"), max_redirects=3)
    assert result == MediaFetched(0, PNG, "image/png")
    message = await failure(server.url("/chain/4"), max_redirects=3)
    assert message == (
        f"Too many redirects (more than 3) fetching '{server.url('/chain/4')}'; "
        f"the last pointed to '{server.url('/png')}'"
    )


@pytest.mark.anyio
async def test_a_redirect_loop_ends(server):
    with anyio.fail_after(30):
        message = await failure(server.url("/loop"))
    assert message.startswith(f"Too many redirects (more than 5) fetching '{server.url('/loop')}'")


@pytest.mark.anyio
async def test_a_redirect_without_location(server):
    message = await failure(server.url("/no-location"))
    assert message == f"HTTP 302 without a Location fetching '{server.url('/no-location')}'"


@pytest.mark.anyio
@pytest.mark.parametrize("code", ["301", "302", "303", "307", "308"])
async def test_a_redirect_within_the_allowed_domains(server, code):
    url = server.url(f"/redirect?code={code}&to=" + quote(server.url("/png"), safe=""))
    result = await fetch_one(url, allowed_domains=frozenset({"127.0.0.1"}))
    assert result == MediaFetched(0, PNG, "image/png")


@pytest.mark.anyio
async def test_a_redirect_out_of_the_allowed_domains_is_not_followed(server):
    target = server.url("/png?from=redirect", host="localhost")
    url = server.url("/redirect?to=" + quote(target, safe=""))
    before = len(server.seen)
    message = await failure(url, allowed_domains=frozenset({"127.0.0.1"}))
    assert message == (
        f"'{short_url(url)}' redirected to '{short_url(target)}', whose domain 'localhost' "
        "is not in --allowed-media-domains ('127.0.0.1')"
    )
    assert [path for path, _, _ in server.seen[before:]] == [urlsplit(url).path + "?" + urlsplit(url).query]


@pytest.mark.anyio
async def test_a_domain_outside_the_allowed_domains_is_never_contacted(server):
    before = len(server.seen)
    message = await failure(server.url("/png"), allowed_domains=frozenset({"localhost", "Example.COM."}))
    assert message == (
        "The URL's domain '127.0.0.1' is not in --allowed-media-domains ('example.com', 'localhost'): "
        f"'{server.url('/png')}'"
    )
    assert server.seen[before:] == []


@pytest.mark.anyio
async def test_a_redirect_to_a_file_url_is_not_followed(server, tmp_path):
    (tmp_path / "secret.png").write_bytes(PNG)
    target = (tmp_path / "secret.png").as_uri()
    url = server.url("/redirect?to=" + quote(target, safe=""))
    message = await failure(url, allowed_local_path=tmp_path)
    assert message.startswith(f"'{short_url(url)}' redirected to 'file:")
    assert message.endswith("secret.png': only http:// and https:// redirects are followed")


# -- URLs and schemes ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://example.com/a.png", "Unsupported URL scheme 'ftp' in 'ftp://example.com/a.png': use http://"),
        ("gopher://example.com/", "Unsupported URL scheme 'gopher' in 'gopher://example.com/': use http://"),
        ("javascript:alert(1)", "Unsupported URL scheme 'javascript' in 'javascript:alert(1)': use http://"),
        ("not a url", "'not a url' is not a URL: use http://, https://, file://"),
        ("", "'' is not a URL: use http://"),
        ("http://[::1/a.png", "'http://[::1/a.png' is not a valid URL: Invalid IPv6 URL"),
        (
            "http://example.com:99999/a.png",
            "'http://example.com:99999/a.png' is not a valid URL: Port out of range",
        ),
        ("http://example.com:port/", "'http://example.com:port/' is not a valid URL: Port could not be cast"),
        ("http:///a.png", "'http:///a.png' has no host"),
    ],
)
async def test_unsupported_and_malformed_urls(anyio_backend, url, expected):
    assert (await failure(url)).startswith(expected)


def test_short_url_drops_credentials_and_query_and_truncates():
    assert (
        short_url("https://user:pw@host.example/a/b.png?X-Amz-Signature=abc")
        == "https://host.example/a/b.png?…"
    )
    long = "https://host.example/" + "a" * 500
    assert len(short_url(long)) == 120 and short_url(long).endswith("…")


# -- file:// ------------------------------------------------------------------------------------


@pytest.fixture
def media(tmp_path) -> Path:
    """tmp/media (allowed) holding img.png, 'a b.png', a directory and a FIFO; tmp/secret.png outside."""
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "img.png").write_bytes(PNG)
    (root / "a b.png").write_bytes(PNG)
    (root / "inner-link.png").symlink_to(root / "img.png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    os.mkfifo(root / "fifo")
    return root


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["img.png", "a b.png", "inner-link.png", "sub/../img.png"])
async def test_files_inside_the_allowed_path(media, name):
    url = "file://" + quote(str(media / name))
    assert await fetch_one(url, allowed_local_path=media) == MediaFetched(0, PNG, "image/png")


@pytest.mark.anyio
async def test_the_allowed_path_and_the_url_may_go_through_symlinks(media, tmp_path):
    (tmp_path / "alias").symlink_to(media)
    assert isinstance(
        await fetch_one((media / "img.png").as_uri(), allowed_local_path=tmp_path / "alias"), MediaFetched
    )
    assert isinstance(
        await fetch_one((tmp_path / "alias" / "img.png").as_uri(), allowed_local_path=media), MediaFetched
    )


@pytest.mark.anyio
async def test_file_urls_need_the_flag(media):
    url = (media / "img.png").as_uri()
    assert await failure(url) == f"file:// URLs need --allowed-local-media-path on the server: '{url}'"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "name", ["escape.png", "../secret.png", "sub/../../secret.png", "../missing.png", ".."]
)
async def test_files_outside_the_allowed_path(media, name):
    url = f"file://{media}/{name}"
    assert await failure(url, allowed_local_path=media) == (
        f"'{url}' is outside --allowed-local-media-path ('{media}')"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["sub", "fifo", ""])
async def test_only_regular_files(media, name):
    url = f"file://{media}/{name}"
    with anyio.fail_after(30):  # opening a FIFO must not wait for a writer
        assert await failure(url, allowed_local_path=media) == f"'{url}' is not a regular file"


@pytest.mark.anyio
async def test_a_missing_file(media):
    url = f"file://{media}/nope.png"
    assert await failure(url, allowed_local_path=media) == f"No such file: '{url}'"


@pytest.mark.anyio
async def test_file_size_limit(media):
    url = (media / "img.png").as_uri()
    assert isinstance(await fetch_one(url, allowed_local_path=media, max_bytes=len(PNG)), MediaFetched)
    assert await failure(url, allowed_local_path=media, max_bytes=len(PNG) - 1) == (
        f"The media at '{url}' is {len(PNG)} bytes, larger than the limit of {len(PNG) - 1} bytes"
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "file://otherhost/img.png",
            "'file://otherhost/img.png' names host 'otherhost': use file:///path for local files",
        ),
        ("file:img.png", "'file:img.png' is not an absolute file path"),
    ],
)
async def test_file_urls_must_name_a_local_absolute_path(media, url, expected):
    assert await failure(url, allowed_local_path=media) == expected


@pytest.mark.anyio
async def test_file_localhost_form_is_local(media):
    url = f"file://localhost{media}/img.png"
    assert await fetch_one(url, allowed_local_path=media) == MediaFetched(0, PNG, "image/png")


# -- limits and lifetime ------------------------------------------------------------------------


def test_limits_from_env_read_vllm_variables_and_flags_win():
    assert FetchLimits.from_env({}) == FetchLimits()
    assert (FetchLimits().image_timeout, FetchLimits().video_timeout, FetchLimits().audio_timeout) == (
        5,
        30,
        10,
    )
    assert FetchLimits().max_bytes == DEFAULT_MAX_BYTES == 64 << 20
    env = {
        "VLLM_IMAGE_FETCH_TIMEOUT": "7",
        "VLLM_VIDEO_FETCH_TIMEOUT": " 2.5 ",
        "VLLM_AUDIO_FETCH_TIMEOUT": "3",
    }
    limits = FetchLimits.from_env(env, audio_timeout=1, allowed_domains=["Media.Example.com."], max_bytes=10)
    assert (limits.image_timeout, limits.video_timeout, limits.audio_timeout) == (7, 2.5, 1)
    assert limits.allowed_domains == frozenset({"media.example.com"})
    assert limits.max_bytes == 10 and limits.timeout("video") == 2.5


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"VLLM_IMAGE_FETCH_TIMEOUT": "soon"}, "VLLM_IMAGE_FETCH_TIMEOUT='soon' is not a number of seconds"),
        (
            {"VLLM_AUDIO_FETCH_TIMEOUT": "0"},
            "VLLM_AUDIO_FETCH_TIMEOUT='0' must be a positive number of seconds",
        ),
    ],
)
def test_limits_from_env_reject_bad_values(env, error):
    with pytest.raises(ValueError) as raised:
        FetchLimits.from_env(env)
    assert str(raised.value) == error


@pytest.mark.parametrize(
    "bad", [{"max_bytes": 0}, {"image_timeout": 0}, {"max_redirects": -1}, {"max_concurrency": 0}]
)
def test_limits_reject_nonsense(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        FetchLimits(**bad)


@pytest.mark.parametrize(
    ("first", "second"), [("asyncio", "trio"), ("trio", "asyncio"), ("asyncio", "asyncio")]
)
def test_the_client_belongs_to_one_event_loop(server, first, second):
    request = [MediaRequest(0, server.url("/png"), "image")]

    async def fetch(fetcher: MediaFetcher, close: bool):
        try:
            return await fetcher.fetch(request)
        finally:
            if close:
                await fetcher.aclose()

    kept = MediaFetcher()
    assert isinstance(anyio.run(fetch, kept, False, backend=first)[0], MediaFetched)
    with pytest.raises(RuntimeError, match="from a second event loop"):
        anyio.run(fetch, kept, False, backend=second)

    closed = MediaFetcher()
    assert isinstance(anyio.run(fetch, closed, True, backend=first)[0], MediaFetched)
    assert isinstance(anyio.run(fetch, closed, True, backend=second)[0], MediaFetched)  # aclose() freed it
