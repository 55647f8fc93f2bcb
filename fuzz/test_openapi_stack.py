"""Schemathesis over `/openapi.json`, through the whole served stack, under asyncio and trio.

The document is fetched from the server itself (a GET through h11 and `AsgiApp`), loaded with
schemathesis, and every operation in it gets hypothesis-generated requests, schema-valid and
schema-violating (schemathesis's positive and negative modes). Each one is written as HTTP/1.1
bytes and served by `fuzz.served` (h11, `AsgiApp`, the real core of four models, the fake engine
with injected failures and disconnects) of three servers (default, all response options, API
key). Four in five bodies and path parameters name a served model, so requests reach the engine
and succeed. For every request:

- `fuzz.served.check_response`: well-formed HTTP, no 5xx but an injected engine failure of that
  status, an OpenAI-shaped error, JSON or SSE that parses, no Python traceback, no hang;
- the status is one the document lists for the operation (or a generic HTTP one it need not);
- a JSON body matches the schema documented for that status (a generic status: `ErrorResponse`).

The example count is half of `FUZZ_EXAMPLES` (`test_raw_http` runs the other half), then four
per operation; the test asserts it served at least that many requests and reached every
operation in the document.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from typing import Any

import requests
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from schemathesis import GenerationMode

from fuzz import harness
from fuzz.engine_driver import engine_scripts
from fuzz.jsontext import dumps
from fuzz.oracle import expect
from fuzz.served import Exchange, check_connection, check_response, make_server, serve_bytes
from fuzz.strategies import polite_headers
from protocol import AppConfig

EXAMPLES = max(harness.EXAMPLES // 2, 50)
SWEEP_EXAMPLES = 4  # per operation, after the main run
BACKENDS = st.sampled_from(["asyncio", "trio"])
SERVERS = [
    make_server("pooling", harness.POOLING_MODELS),
    make_server("pooling-options", harness.POOLING_MODELS, harness.OPTIONS_CONFIG),
    make_server("pooling-api-key", harness.POOLING_MODELS, AppConfig(api_keys=[harness.API_KEY])),
]
MODEL_NAMES = [name for model in harness.POOLING_MODELS for name in model.names]
# Statuses any HTTP operation may answer without the document listing them: a method the path
# does not take, a body over the cap, a content type other than JSON.
GENERIC_STATUSES = {405, 413, 415}
OPERATIONS: Counter[tuple[str, str]] = Counter()  # (method, path template) -> requests sent


@functools.cache
def document() -> dict[str, Any]:
    """`/openapi.json` as the served stack answers it."""
    connection = serve_bytes(SERVERS[0], b"GET /openapi.json HTTP/1.1\r\nHost: testserver\r\n\r\n")
    (exchange,) = connection.exchanges
    check_response(exchange)
    expect(exchange.status == 200, f"/openapi.json answered {exchange.status}", exchange.body[:500])
    return json.loads(exchange.body)


@functools.cache
def operations() -> list[tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]:
    """Schemathesis's (positive, negative) case strategies for each operation of the document."""
    schema = schemathesis.openapi.from_dict(document())
    return [
        (
            result.ok().as_strategy(generation_mode=GenerationMode.POSITIVE),
            result.ok().as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )
        for result in schema.get_all_operations()
    ]


@functools.cache
def all_cases() -> st.SearchStrategy[Any]:
    return st.one_of(*(positive | negative for positive, negative in operations()))


@functools.cache
def validator(method: str, path: str, status: int) -> Draft202012Validator | None:
    """The documented schema of this operation's `status` response (None: none documented)."""
    operation = document()["paths"][path][method.lower()]
    response = operation["responses"].get(str(status))
    schema = ((response or {}).get("content") or {}).get("application/json", {}).get("schema")
    if schema is None:
        return None
    return Draft202012Validator({**schema, "components": document()["components"]})


def wire(case: Any, extra_headers: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """The case as the bytes an HTTP/1.1 client writes (schemathesis's own serialisation)."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    fields = {
        key: kwargs[key] for key in ("method", "url", "headers", "params", "data", "cookies") if key in kwargs
    }
    if "json" in kwargs:
        try:
            prepared = requests.Request(json=kwargs["json"], **fields).prepare()
        except ValueError:  # NaN or infinity: write it as a lax client would
            prepared = requests.Request(data=dumps(kwargs["json"]), **fields).prepare()
    else:
        prepared = requests.Request(**fields).prepare()
    body = prepared.body or b""
    body = body.encode() if isinstance(body, str) else body
    headers = {name.lower(): value for name, value in prepared.headers.items()}
    headers.pop("content-length", None)
    lines = [f"{prepared.method} {prepared.path_url} HTTP/1.1".encode(), b"host: testserver"]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers.items()]
    lines += [name + b": " + value for name, value in extra_headers if name not in (b"content-type",)]
    lines.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def check_documented(method: str, path: str, exchange: Exchange) -> None:
    """The status is documented (or generic) and a JSON body matches its documented schema."""
    status = exchange.status
    assert status is not None
    documented = {int(code) for code in document()["paths"][path][method.lower()]["responses"]}
    where = f"{method} {path} -> {status}"
    expect(
        status in documented or status in GENERIC_STATUSES or exchange.engine_failure == status,
        f"{where}: not a status the document lists ({sorted(documented)})",
        exchange.body[:500],
    )
    content_type = (exchange.header(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type != b"application/json":
        return
    schema = validator(method, path, status)
    if schema is None and status >= 400:  # a generic status: the OpenAI error
        schema = Draft202012Validator({"$ref": "#/components/schemas/ErrorResponse", **document()})
    if schema is not None:
        errors = sorted(schema.iter_errors(json.loads(exchange.body)), key=str)
        expect(
            not errors,
            f"{where}: the body does not match the documented schema",
            errors[:3],
            exchange.body[:800],
        )


def serve_case(data: st.DataObject, backend: str, cases: st.SearchStrategy[Any]) -> None:
    """Draw a case from `cases`, serve it, and check the answer."""
    case = data.draw(cases, label="case")
    model = data.draw(st.sampled_from([None, *MODEL_NAMES]), label="model")
    if model is not None:  # name a served model, so the request can reach the engine
        if isinstance(case.body, dict):
            case.body["model"] = model
        if "model" in (case.path_parameters or {}):
            case.path_parameters["model"] = model
    headers = data.draw(polite_headers(), label="headers") if data.draw(st.booleans()) else ()
    server = data.draw(st.sampled_from(SERVERS), label="server")
    script = data.draw(engine_scripts(), label="engine")
    connection = serve_bytes(server, wire(case, headers), scripts=[script], backend=backend)
    OPERATIONS[(case.method.upper(), case.path)] += 1
    negative = case.meta is not None and case.meta.generation.mode is GenerationMode.NEGATIVE
    harness.EXERCISED["openapi-negative" if negative else "openapi-positive"] += len(connection.exchanges)
    check_connection(connection)
    for exchange in connection.exchanges:
        if exchange.status is not None:
            harness.STATUSES[exchange.status] += 1
        check_response(exchange)
        if exchange.ended and exchange.protocol_error is None:
            check_documented(case.method.upper(), case.path, exchange)


@harness.fuzz_settings(EXAMPLES)
@given(data=st.data(), backend=BACKENDS)
def _openapi_operations_are_served_well(data: st.DataObject, backend: str) -> None:
    serve_case(data, backend, all_cases())


def sweep(cases: st.SearchStrategy[Any]) -> None:
    """A few requests to one operation. Why: hypothesis rarely returns to an operation whose
    cases it has exhausted (a GET without parameters has one), so the main run may miss it."""

    @settings(harness.fuzz_settings(SWEEP_EXAMPLES), database=None)
    @given(data=st.data(), backend=BACKENDS)
    def _sweep(data: st.DataObject, backend: str) -> None:
        serve_case(data, backend, cases)

    _sweep()


def test_openapi_document_is_served() -> None:
    """/openapi.json is OpenAPI 3.1 that schemathesis loads, listing the routes the server takes."""
    doc = document()
    expect(doc["openapi"].startswith("3.1"), "not OpenAPI 3.1", doc.get("openapi"))
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health"):
        expect(path in doc["paths"], f"{path} is not documented")
    operations = list(schemathesis.openapi.from_dict(doc).get_all_operations())
    expect(all(result.ok() is not None for result in operations), "an operation schemathesis cannot load")


def test_every_openapi_operation_is_served_well() -> None:
    """Schema-valid and schema-violating requests to every documented operation, served over h11
    and ASGI under asyncio and trio: documented, well-formed answers, no 5xx but injected engine
    failures, no hang, no traceback."""
    before = sum(harness.EXERCISED.values())
    _openapi_operations_are_served_well()
    for positive, negative in operations():
        sweep(positive | negative)
    done = sum(harness.EXERCISED.values()) - before
    assert done >= EXAMPLES, f"only {done} requests exercised, expected at least {EXAMPLES}"
    documented = {(method.upper(), path) for path, item in document()["paths"].items() for method in item}
    missed = documented - set(OPERATIONS)
    assert not missed, f"operations never exercised: {sorted(missed)}"
