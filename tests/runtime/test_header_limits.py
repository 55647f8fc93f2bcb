"""Header count and size limits as a client sees them, over HTTP/1.1 and HTTP/2 (h2c), both runtimes.

Within hypercorn's own limits the core answers: a 431 in OpenAI's shape. Past them (twice the
configured size, plus a read) hypercorn refuses the head itself: HTTP/1.1 gets an empty 431 and a
closed connection, HTTP/2 a GOAWAY for the connection (h2 gives no per-request answer there).
"""

from __future__ import annotations

import httpx
import pytest

from sansllm.listen import set_header_limits
from tests.runtime.test_openai_client import serve

MAX_BYTES = 8 * 1024
MAX_COUNT = 50
FLAGS = ("--h11-max-header-count", str(MAX_COUNT), "--h11-max-incomplete-event-size", str(MAX_BYTES))


@pytest.fixture(params=["HTTP/1.1", "HTTP/2"])
def http_version(request) -> str:
    return request.param


@pytest.fixture
def server(runtime):
    with serve(runtime, *FLAGS, configure=lambda config: set_header_limits(config, MAX_BYTES)) as running:
        yield running


@pytest.fixture
def client(http_version):
    # HTTP/2 in cleartext with prior knowledge (h2c), as `curl --http2-prior-knowledge`
    options = {"http1": False, "http2": True} if http_version == "HTTP/2" else {}
    with httpx.Client(timeout=30, **options) as client:
        yield client


def refused_431(response: httpx.Response, http_version: str) -> str:
    assert response.http_version == http_version
    assert response.status_code == 431
    error = response.json()["error"]
    assert error["code"] == 431 and error["type"] == "Request Header Fields Too Large"
    assert set(error) == {"message", "type", "param", "code"}
    return error["message"]


def test_requests_within_the_limits_are_served(server, client, http_version):
    headers = {f"x-field-{i}": "v" for i in range(MAX_COUNT - 10)} | {"x-large": "a" * (MAX_BYTES // 2)}
    response = client.get(f"{server.url}/v1/models", headers=headers)
    assert response.http_version == http_version and response.status_code == 200


def test_too_many_header_fields_get_an_openai_431(server, client, http_version):
    headers = {f"x-field-{i}": "v" for i in range(MAX_COUNT + 10)}
    message = refused_431(client.get(f"{server.url}/v1/models", headers=headers), http_version)
    assert f"at most {MAX_COUNT} are allowed" in message


def test_too_many_header_bytes_get_an_openai_431(server, client, http_version):
    response = client.get(f"{server.url}/v1/models", headers={"cookie": "a" * (MAX_BYTES + 1)})
    assert f"at most {MAX_BYTES} are allowed" in refused_431(response, http_version)


def test_past_hypercorns_limit_the_head_is_refused_before_the_app(server, client, http_version):
    huge = {"cookie": "a" * (4 * MAX_BYTES + 128 * 1024)}
    if http_version == "HTTP/2":
        with pytest.raises(httpx.RemoteProtocolError):  # GOAWAY ENHANCE_YOUR_CALM: the connection ends
            client.get(f"{server.url}/v1/models", headers=huge)
    else:
        response = client.get(f"{server.url}/v1/models", headers=huge)
        assert (response.status_code, response.content, response.headers["connection"]) == (431, b"", "close")
    assert client.get(f"{server.url}/health").status_code == 200  # the server goes on, on a new connection


def test_the_flags_set_the_cores_limits_and_hypercorns_above_them(capsys):
    from sansllm.args import parse_serve_args
    from sansllm.assemble import app_config_from_args
    from sansllm.listen import hypercorn_config_from_args

    defaults = parse_serve_args([], environ={})
    config = app_config_from_args(defaults)
    assert (config.max_header_count, config.max_header_bytes) == (256, 4 * 1024 * 1024)  # vLLM's
    hypercorn = hypercorn_config_from_args(defaults)
    # both HTTP versions get the same room (hypercorn's HTTP/2 default would be 64 KiB)
    assert hypercorn.h11_max_incomplete_size == hypercorn.h2_max_header_list_size > 2 * config.max_header_bytes
    args = parse_serve_args(["--h11-max-header-count", "20", "--h11-max-incomplete-event-size", "1K"], environ={})
    assert (app_config_from_args(args).max_header_count, app_config_from_args(args).max_header_bytes) == (20, 1024)
    with pytest.raises(SystemExit):
        parse_serve_args(["--h11-max-header-count", "0"], environ={})
    assert "--h11-max-header-count must be at least 1" in capsys.readouterr().err
