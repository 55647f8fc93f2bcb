"""Raw HTTP/1.1 bytes through h11 into the served app: never a 5xx, a hang or a leaked traceback.

Hypothesis draws a client connection's bytes (`fuzz.raw_http.byte_streams`: pipelined requests
built from the fuzz request strategies, valid or with one broken), and `fuzz.served` serves them
as hypercorn would, through `AsgiApp` over the real core and the fake engine, under asyncio or
trio. For every connection:

- every response the app gives is well formed HTTP (h11 accepts it) and ASGI (one start, one end),
  never a 5xx unless the engine injected that failure, an OpenAI-shaped error for 4xx, JSON or SSE
  that parses, and no Python traceback or exception repr in its body;
- a request h11 refuses gets a 400 (431 for a huge head, 501 for an unknown coding) and the
  connection closes, as with hypercorn; the app never sees it;
- a valid stream has every pipelined request answered in order, up to the one that closes;
- no connection takes longer than `fuzz.served.HANG_SECONDS`, and no engine work outlives its request;
- chat media parts, to a text-only server or a vision one whose URLs the fake fetcher answers:
  `fuzz.served.check_media_exchange`.

It runs half of `FUZZ_EXAMPLES` connections (`test_openapi_stack` runs the other half) and asserts
it served at least that many requests (a connection carries 1.4 on average).
"""

from __future__ import annotations

from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from fuzz import harness
from fuzz.engine_driver import engine_scripts
from fuzz.known_bugs import known_bug
from fuzz.oracle import expect
from fuzz.raw_http import ByteStream, byte_streams, describe, quick_requests
from fuzz.served import (
    Connection,
    check_connection,
    check_media_exchange,
    check_response,
    make_server,
    request_media_parts,
    serve_bytes,
)
from fuzz.strategies import any_requests, garbage_requests, media_requests, pooling_requests
from protocol import AppConfig

EXAMPLES = max(harness.EXAMPLES // 2, 50)  # test_openapi_stack serves the other half
BACKENDS = st.sampled_from(["asyncio", "trio"])

# Each connection carries one request from the fuzz strategies and a few cheap everyday ones.
GENERATIVE = any_requests(harness.PROFILE)
QUICK = quick_requests(harness.PROFILE)
SERVERS: list[tuple[Any, st.SearchStrategy[Any], st.SearchStrategy[Any]]] = [
    (make_server("default", [harness.MODEL]), GENERATIVE, QUICK),
    (make_server("options", [harness.MODEL], harness.OPTIONS_CONFIG), GENERATIVE, QUICK),
    (
        make_server("api-key", [harness.MODEL], AppConfig(api_keys=[harness.API_KEY])),
        GENERATIVE | garbage_requests(harness.PROFILE),
        QUICK,
    ),
    (
        make_server("pooling", harness.POOLING_MODELS),
        pooling_requests(harness.POOLING_PROFILE),
        quick_requests(harness.POOLING_PROFILE),
    ),
    # a small body cap: 413s, drained or closing, with more requests behind them
    (make_server("small-body", [harness.MODEL], max_body_bytes=2048), GENERATIVE, QUICK),
    # a vision model: image parts inline and fetched (the fake fetcher answers from the script)
    (
        make_server("vision", [harness.VISION_MODEL]),
        any_requests(harness.VISION_PROFILE) | media_requests(harness.VISION_PROFILE),
        quick_requests(harness.VISION_PROFILE),
    ),
    (
        make_server("vision-options", [harness.VISION_EMBEDS_MODEL], harness.VISION_OPTIONS_CONFIG),
        any_requests(harness.VISION_LIMITED_PROFILE) | media_requests(harness.VISION_LIMITED_PROFILE),
        quick_requests(harness.VISION_LIMITED_PROFILE),
    ),
]


def check_valid_stream(stream: ByteStream, connection: Connection) -> None:
    """Well-formed pipelined requests are all answered in order, up to the one that closes."""
    refused = [e.protocol_error for e in connection.exchanges if e.protocol_error is not None]
    expect(not refused, "h11 refused a well-formed request", refused, describe(stream))
    served = connection.app_exchanges
    if connection.closed_by == "client-left":
        return
    closing = next((i for i, request in enumerate(stream.requests) if request.closes), None)
    expected = len(stream.requests) if closing is None else closing + 1
    if connection.closed_by == "close" and served:
        last = served[-1]
        if last.header(b"connection") == b"close":  # the app closed it (a 413 it would not drain)
            expected = len(served)
    expect(
        len(served) == expected,
        f"{len(served)} of {expected} pipelined requests were answered (closed by {connection.closed_by})",
        [(e.method, e.target[:60], e.status) for e in served],
        describe(stream),
    )


@harness.fuzz_settings(EXAMPLES)
@given(data=st.data(), backend=BACKENDS)
def _raw_http_is_answered_well(data: st.DataObject, backend: str) -> None:
    server, requests, quick = data.draw(st.sampled_from(SERVERS), label="server")
    stream = data.draw(byte_streams(requests, quick), label="stream")
    assume(all(known_bug(request) is None for request in stream.sources))
    scripts = data.draw(st.lists(engine_scripts(), min_size=1, max_size=4), label="scripts")
    connection = serve_bytes(server, stream.data, splits=stream.splits, scripts=scripts, backend=backend)
    harness.EXERCISED[f"raw-http-{stream.kind}"] += max(len(connection.exchanges), 1)
    for exchange in connection.exchanges:
        if exchange.status is not None:
            harness.STATUSES[exchange.status] += 1
            if request_media_parts(exchange):
                harness.MEDIA[str(exchange.status)] += 1
        harness.count_media(None, None, exchange.fetched)
    check_connection(connection)
    for exchange in connection.exchanges:
        check_response(exchange)
        check_media_exchange(exchange, server)
    if stream.kind == "valid":
        check_valid_stream(stream, connection)


def test_raw_http_bytes_are_answered_well() -> None:
    """Valid, pipelined and broken HTTP/1.1 byte streams, under asyncio and trio: well-formed
    answers, no 5xx but injected engine failures, no hang, no traceback in any body."""
    before = sum(harness.EXERCISED.values())
    _raw_http_is_answered_well()
    done = sum(harness.EXERCISED.values()) - before
    assert done >= EXAMPLES, f"only {done} requests exercised, expected at least {EXAMPLES}"
