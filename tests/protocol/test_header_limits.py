"""The core's header limits: more fields, or more bytes of them, than allowed is a 431 in OpenAI's shape."""

from __future__ import annotations

from tests.protocol.test_app import JSON, error_of, make_app, respond


def fields(count: int, value: bytes = b"v") -> list[tuple[bytes, bytes]]:
    return [(b"x-field-%d" % i, value) for i in range(count)]


def test_header_count_limit_is_inclusive_and_past_it_a_431():
    app = make_app(max_header_count=10)
    assert respond(app, "GET", "/v1/models", headers=fields(10))[0] == 200
    status, error = error_of(respond(app, "GET", "/v1/models", headers=fields(11)))
    assert (status, error["type"], error["param"]) == (431, "Request Header Fields Too Large", None)
    assert error["message"] == "Request Header Fields Too Large: 11 header fields, at most 10 are allowed"


def test_header_bytes_are_counted_as_http_1_1_writes_them():
    one = [(b"cookie", b"a" * 90)]  # "cookie: " + 90 bytes + CRLF = 100 bytes
    assert respond(make_app(max_header_bytes=100), "GET", "/health", headers=one)[0] == 200
    status, error = error_of(respond(make_app(max_header_bytes=99), "GET", "/health", headers=one))
    assert status == 431
    assert error["message"] == "Request Header Fields Too Large: the header fields take 100 bytes, at most 99 are allowed"


def test_the_431_comes_before_routing_and_auth_and_keeps_cors_headers():
    app = make_app(max_header_count=3, api_keys=["k"])
    headers = [JSON, (b"origin", b"https://app.example"), *fields(5)]
    status, response_headers, _ = respond(app, "POST", "/v1/chat/completions", body={}, headers=headers)
    assert status == 431  # not the 401 the missing key would give: nothing past the head was looked at
    assert response_headers[b"access-control-allow-origin"] == b"*"


def test_vllms_defaults_allow_ordinary_requests():
    app = make_app()
    assert respond(app, "GET", "/v1/models", headers=fields(256, b"v" * 100))[0] == 200
    assert error_of(respond(app, "GET", "/v1/models", headers=fields(257)))[0] == 431
