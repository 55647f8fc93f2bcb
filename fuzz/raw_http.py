"""Raw HTTP/1.1 byte streams: the fuzz requests serialised as a client writes them, and broken.

`byte_streams(requests)` draws one client connection: one to four requests from `requests` (a
`FuzzRequest` strategy of `fuzz.strategies`) pipelined on one connection, each framed with
Content-Length or chunked transfer coding (random chunk sizes, chunk extensions, trailers), as
HTTP/1.1 or HTTP/1.0, with keep-alive or `Connection: close`, `Expect: 100-continue`, long and
non-ASCII (obs-text) header values, and cut into random writes. A "valid" stream is all well
formed, so every request in it must reach the app and be answered. Otherwise one request is
broken by a mutation: a broken request line, bad header syntax, duplicate or conflicting
Content-Length, broken chunked coding, a truncated body, a huge header, raw non-ASCII bytes, byte
flips, or plain garbage, possibly followed by more requests.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

from fuzz import media_samples
from fuzz.strategies import FuzzRequest, Profile

HOST = b"testserver"
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"([^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
# Headers the wire framing owns: the serialiser sets them, so the request's own are dropped.
_FRAMING = {b"host", b"content-length", b"transfer-encoding", b"connection", b"expect", b"te", b"upgrade"}
_TARGET_SAFE = "/?=&%:@!$'()*+,;~-._"
MUTATIONS = (
    "request_line",
    "bad_header",
    "content_length",
    "chunked",
    "truncated",
    "huge_header",
    "non_ascii",
    "flip",
    "garbage",
)


@dataclass(frozen=True)
class WireRequest:
    """One request as written on the wire."""

    data: bytes
    source: FuzzRequest | None  # the request it carries (None: made-up bytes)
    closes: bool  # the client asked to close after it (Connection: close, or HTTP/1.0)


@dataclass(frozen=True)
class ByteStream:
    """What one client writes on one connection before it closes its side."""

    requests: tuple[WireRequest, ...]
    kind: str  # "valid", or the mutation that broke one request
    splits: tuple[int, ...]  # offsets where the client's writes are cut

    @property
    def data(self) -> bytes:
        return b"".join(request.data for request in self.requests)

    @property
    def sources(self) -> list[FuzzRequest]:
        return [request.source for request in self.requests if request.source is not None]


def target_of(path: str) -> bytes:
    """The request target a client would send for `path`: non-ASCII and spaces percent-encoded."""
    target = quote(path, safe=_TARGET_SAFE).encode("ascii")
    return target if target.startswith(b"/") or target == b"*" else b"/" + target


def _wire_headers(request: FuzzRequest) -> list[tuple[bytes, bytes]]:
    """The request's headers that are valid HTTP syntax, less the framing ones."""
    headers = []
    for name, value in request.headers:
        value = value.strip(b" \t")
        if _TOKEN.fullmatch(name) and _FIELD_VALUE.fullmatch(value) and name.lower() not in _FRAMING:
            headers.append((name, value))
    return headers


def _chunked(draw: st.DrawFn, body: bytes) -> bytes:
    """`body` in chunked transfer coding: random chunk sizes, hex case, extensions, trailers."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(len(body) - 1, 1)), max_size=6))))
    bounds = [0, *(cut for cut in cuts if cut < len(body)), len(body)]
    upper = draw(st.booleans())
    extension = draw(st.sampled_from([b"", b"", b";a=b", b';name="quoted"']))
    out = bytearray()
    for start, end in zip(bounds, bounds[1:], strict=False):
        digits = format(end - start, "X" if upper else "x").encode()
        out += digits + extension + b"\r\n" + body[start:end] + b"\r\n"
    out += b"0\r\n"
    if draw(st.integers(0, 4)) == 0:
        out += b"X-Trailer: done\r\n"
    return bytes(out + b"\r\n")


@functools.cache
@st.composite
def wire_requests(draw: st.DrawFn, requests: st.SearchStrategy[FuzzRequest]) -> WireRequest:
    """A well-formed HTTP/1.x request carrying a drawn `FuzzRequest`."""
    request = draw(requests)
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.1", b"1.0"]))
    headers = _wire_headers(request)
    if version == b"1.1" or draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), (b"Host", HOST))
    closes = version == b"1.0"
    connection = draw(st.sampled_from([None, None, None, b"keep-alive", b"close", b"Close"]))
    if connection is not None:
        headers.append((b"Connection", connection))
        closes = closes or connection.lower() == b"close"
    if version == b"1.1" and request.body and draw(st.integers(0, 5)) == 0:
        headers.append((b"Expect", b"100-continue"))
    extra = draw(st.integers(0, 6))
    if extra == 0:  # long, but under the 16 KiB head limit
        headers.append((b"X-Long", b"v" * draw(st.integers(1000, 12000))))
    elif extra == 1:  # obs-text: bytes a client may send, which the app must survive
        value = draw(st.binary(min_size=1, max_size=20).map(lambda raw: bytes(0x80 | b for b in raw)))
        headers.append((b"X-Bytes", value))
    elif extra == 2:
        headers.append((b"User-Agent", b"fuzz"))
        headers.append((b"user-agent", b"fuzz-again"))
    body = request.body
    chunked = version == b"1.1" and bool(body) and draw(st.integers(0, 2)) == 0
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = _chunked(draw, body)
    else:
        if body or request.method not in ("GET", "HEAD") or draw(st.booleans()):
            headers.append((b"Content-Length", str(len(body)).encode()))
        payload = body
    if draw(st.booleans()):
        headers = [(name.lower(), value) for name, value in headers]
    head = request.method.encode("ascii") + b" " + target_of(request.path) + b" HTTP/" + version + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return WireRequest(head + b"\r\n" + payload, request, closes)


def _quick(method: str, path: str, body: dict[str, Any] | None = None) -> FuzzRequest:
    return FuzzRequest(method, path, (), b"" if body is None else json.dumps(body).encode(), "quick", body)


@functools.cache
def quick_requests(profile: Profile) -> st.SearchStrategy[FuzzRequest]:
    """Small everyday requests, cheap to draw, so the HTTP framing gets most of the effort; headers
    from a short list (JSON content type, the API key or not)."""
    model = profile.model_names[0]
    by_task = dict(profile.model_tasks)
    embed = next((name for name, tasks in by_task.items() if "embed" in tasks), None)
    cross = next((name for name, tasks in by_task.items() if "score" in tasks), None)
    requests = [
        _quick("POST", "/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 5}),
        _quick("POST", "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 3, "stream": True}),
        _quick("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        _quick(
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "n": 2, "max_tokens": 4},
        ),
        _quick("POST", "/tokenize", {"prompt": "héllo"}),
        _quick("POST", "/detokenize", {"tokens": [72, 105]}),
        _quick("GET", "/v1/models"),
        _quick("GET", f"/v1/models/{model}"),
        _quick("GET", "/health"),
        _quick("GET", "/version"),
        _quick("GET", "/openapi.json"),
        _quick("HEAD", "/health"),
        _quick("OPTIONS", "/v1/completions"),
        _quick("DELETE", "/v1/completions"),
    ]
    if profile.media:  # an inline image, and one the fake fetcher answers
        for url in (media_samples.image_data_urls()["png"], "https://example.com/cat.png"):
            image = {"type": "image_url", "image_url": {"url": url}}
            requests.append(
                _quick(
                    "POST",
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}]},
                )
            )
    if embed is not None:
        requests += [
            _quick("POST", "/v1/embeddings", {"model": embed, "input": ["a", "bc"]}),
            _quick("POST", "/v1/embeddings", {"model": embed, "input": "a", "encoding_format": "base64"}),
        ]
    if cross is not None:
        requests += [
            _quick("POST", "/score", {"model": cross, "text_1": "a", "text_2": ["b", "c"]}),
            _quick("POST", "/rerank", {"model": cross, "query": "q", "documents": ["x", "y"], "top_n": 1}),
        ]
    headers = st.sampled_from(
        [
            ((b"content-type", b"application/json"),),
            ((b"content-type", b"application/json"), (b"authorization", b"Bearer sk-test")),
            ((b"content-type", b"application/json; charset=utf-8"), (b"x-request-id", b"abc-1")),
            ((b"Content-Type", b"text/plain"),),
        ]
    )
    return st.builds(
        lambda request, headers: FuzzRequest(
            request.method, request.path, headers, request.body, request.family, request.payload
        ),
        st.sampled_from(requests),
        headers,
    )


def _replace_line(data: bytes, index: int, line: bytes) -> bytes:
    head, sep, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    lines[index] = line
    return b"\r\n".join(lines) + sep + rest


def _insert_header(data: bytes, line: bytes) -> bytes:
    first, _, rest = data.partition(b"\r\n")
    return first + b"\r\n" + line + b"\r\n" + rest


def _split_message(data: bytes) -> tuple[bytes, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _without_framing(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    keep = [lines[0]] + [
        line
        for line in lines[1:]
        if line.split(b":", 1)[0].strip().lower() not in (b"content-length", b"transfer-encoding")
    ]
    return b"\r\n".join(keep)


@functools.cache
@st.composite
def broken_requests(draw: st.DrawFn, requests: st.SearchStrategy[FuzzRequest]) -> tuple[str, WireRequest]:
    """One request broken by one of `MUTATIONS`."""
    wire = draw(wire_requests(requests))
    source = wire.source
    assert source is not None
    method, target = source.method.encode("ascii"), target_of(source.path)
    kind = draw(st.sampled_from(MUTATIONS))
    data = wire.data
    head, body = _split_message(data)
    if kind == "request_line":
        line = draw(
            st.sampled_from(
                [
                    method + b" " + target + b" HTTP/1.1 extra",
                    method + b"  " + target + b" HTTP/1.1",
                    method + b" " + target,
                    target + b" HTTP/1.1",
                    method + b" " + target + b" HTTP/2.0",
                    method + b" " + target + b" HTTP/1.10",
                    method + b" " + target + b" http/1.1",
                    method + b"\t" + target + b"\tHTTP/1.1",
                    method.lower() + b" " + target + b" HTTP/1.1",
                    method + b" " + target + b"#fragment HTTP/1.1",
                    method + b" /a b HTTP/1.1",
                    method + b" \x00 HTTP/1.1",
                    method + b" " + b"/" + b"x" * 20000 + b" HTTP/1.1",
                    b"M" * 300 + b" / HTTP/1.1",
                    method + b" http://testserver" + target + b" HTTP/1.1",
                    b"OPTIONS * HTTP/1.1",
                    b"",
                    b" ",
                    b"\r\n" + method + b" " + target + b" HTTP/1.1",
                ]
            )
        )
        data = _replace_line(data, 0, line)
    elif kind == "bad_header":
        line = draw(
            st.sampled_from(
                [
                    b"NoColon",
                    b"Name : v",
                    b" folded continuation",
                    b"\tfolded",
                    b"Na me: v",
                    b": v",
                    b"X: a\x00b",
                    b"X: a\rb",
                    b"X\x7f: v",
                    b"X-\xc3\xa9: v",
                    b"X: \xc3\xa9t\xc3\xa9",
                    b"Host: second",
                    b"Host:",
                    b"Content-Type: text/plain",
                    b"Authorization: Bearer \xff\xfe",
                    b"X-Request-Id: \x80\x81",
                ]
            )
        )
        data = _insert_header(data, line) if draw(st.booleans()) else _replace_line(data, -1, line)
    elif kind == "content_length":
        n = len(body)
        value = draw(
            st.sampled_from(
                [
                    f"{n}, {n}",
                    f"{n},{n + 1}",
                    "-1",
                    f"+{n}",
                    hex(n),
                    f" {n} ",
                    "9" * 30,
                    str(10**9),
                    str(n + 7),
                    str(max(n - 3, 0)),
                    "",
                    "abc",
                ]
            )
        ).encode()
        lines = [b"Content-Length: " + value]
        if draw(st.booleans()):
            lines.append(b"Content-Length: " + str(draw(st.sampled_from([n, n + 1, 0]))).encode())
        if draw(st.integers(0, 3)) == 0:
            lines.append(b"Transfer-Encoding: chunked")
        head = b"\r\n".join([_without_framing(head), *lines])
        data = head + b"\r\n\r\n" + body
    elif kind == "chunked":
        raw = source.body or b"{}"
        variant = draw(
            st.sampled_from(
                [
                    b"zz\r\n" + raw + b"\r\n0\r\n\r\n",
                    b"-1\r\n" + raw + b"\r\n0\r\n\r\n",
                    b"f" * 24 + b"\r\n" + raw + b"\r\n0\r\n\r\n",
                    format(len(raw), "x").encode() + b"\r\n" + raw + b"\r\n",  # no last chunk
                    format(len(raw) + 5, "x").encode() + b"\r\n" + raw + b"\r\n0\r\n\r\n",
                    format(len(raw), "x").encode() + b"\r\n" + raw + b"0\r\n\r\n",  # no CRLF after data
                    format(len(raw), "x").encode() + b"\r\n" + raw + b"\r\n0\r\n\r\ntrailing bytes",
                    format(len(raw), "x").encode() + b";" + b"e" * 20000 + b"\r\n" + raw + b"\r\n0\r\n\r\n",
                    format(len(raw), "x").encode() + b"\r\n" + raw + b"\r\n0\r\nBad Trailer\r\n\r\n",
                ]
            )
        )
        coding = draw(
            st.sampled_from(
                [b"chunked", b"chunked", b"gzip, chunked", b"chunked, gzip", b"identity", b"CHUNKED"]
            )
        )
        head = _without_framing(head) + b"\r\nTransfer-Encoding: " + coding
        if draw(st.integers(0, 3)) == 0:
            head = _replace_line(head + b"\r\n\r\n", 0, method + b" " + target + b" HTTP/1.0")[:-4]
        data = head + b"\r\n\r\n" + variant
    elif kind == "truncated":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == "huge_header":
        if draw(st.booleans()):
            data = _insert_header(data, b"X-Huge: " + b"h" * draw(st.integers(17_000, 70_000)))
        else:
            many = b"\r\n".join(b"X-H%d: %s" % (i, b"v" * 100) for i in range(draw(st.integers(100, 400))))
            data = _insert_header(data, many)
    elif kind == "non_ascii":
        choice = draw(st.integers(0, 2))
        raw = draw(st.text(min_size=1, max_size=8).map(str.encode))
        if choice == 0:
            data = _replace_line(data, 0, method + b" /" + raw + b" HTTP/1.1")
        elif choice == 1:
            data = _insert_header(data, b"X-" + raw + b": v")
        else:
            data = _replace_line(data, 0, raw + b" " + target + b" HTTP/1.1")
    elif kind == "flip":
        buffer = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, max(len(buffer) - 1, 0)))
            action = draw(st.sampled_from(["replace", "insert", "delete"]))
            byte = draw(st.sampled_from([0, 9, 10, 13, 32, 58, 0x7F, 0xFF]) | st.integers(0, 255))
            if action == "replace" and buffer:
                buffer[at] = byte
            elif action == "insert":
                buffer.insert(at, byte)
            elif buffer:
                del buffer[at]
        data = bytes(buffer)
    else:  # garbage
        data = draw(
            st.binary(min_size=1, max_size=300)
            | st.sampled_from([b"\r\n\r\n", b"\x16\x03\x01\x02\x00", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"])
        )
        return kind, WireRequest(data, None, False)
    return kind, WireRequest(data, source, wire.closes)


@functools.cache
@st.composite
def byte_streams(
    draw: st.DrawFn, requests: st.SearchStrategy[FuzzRequest], quick: st.SearchStrategy[FuzzRequest]
) -> ByteStream:
    """One connection's bytes: a request from `requests`, valid or broken, with up to three cheap
    ones from `quick` pipelined around it, cut into writes at random offsets.

    Why one rich request per connection: hypothesis's cost per example grows faster than its size,
    and the rich bodies are fuzzed in depth by `test_fuzz_requests` already."""
    kind = "valid"
    if draw(st.integers(0, 2)) > 0:  # two thirds break the request
        kind, main = draw(broken_requests(requests))
    else:
        main = draw(wire_requests(requests))
    before = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
    after = draw(st.sampled_from([0, 0, 1, 2]))
    pipelined = [
        *(draw(wire_requests(quick)) for _ in range(before)),
        main,
        *(draw(wire_requests(quick)) for _ in range(after)),
    ]
    size = sum(len(request.data) for request in pipelined)
    splits = draw(st.lists(st.integers(1, max(size - 1, 1)), max_size=6)) if size > 1 else []
    return ByteStream(tuple(pipelined), kind, tuple(sorted(set(splits))))


def describe(stream: ByteStream, limit: int = 600) -> Any:
    """A short view of a stream for failure messages."""
    return {"kind": stream.kind, "bytes": stream.data[:limit], "splits": stream.splits}
