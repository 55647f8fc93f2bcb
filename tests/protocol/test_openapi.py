"""/openapi.json: generated from the structs the server decodes and encodes with."""

from __future__ import annotations

import json

import jsonschema
import pytest

from protocol.app import _ROUTES, OPEN_PATHS
from tests.protocol.test_app import make_app, respond


@pytest.fixture(scope="module")
def document() -> dict:
    status, headers, body = respond(make_app(api_keys=["k"]), "GET", "/openapi.json", headers=())
    assert status == 200 and headers[b"content-type"] == b"application/json"
    return json.loads(body)


def test_every_route_is_described(document):
    described = set(document["paths"])
    assert {path for path in _ROUTES if path not in ("/invocations", "/openapi.json", "/docs")} <= described
    assert "/openapi.json" in OPEN_PATHS  # clients read it before they have a key


def test_docs_page_loads_swagger_ui_over_the_document_under_the_root_path():
    status, headers, body = respond(make_app(api_keys=["k"], root_path="/llm"), "GET", "/docs", headers=())
    assert status == 200 and headers[b"content-type"].startswith(b"text/html")
    assert b'url: "/llm/openapi.json"' in body and b"swagger-ui-bundle.js" in body


def test_component_schemas_are_valid_json_schemas(document):
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize(
    ("path", "body", "valid"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}, True),
        ("/v1/chat/completions", {"model": "m", "messages": "hi"}, False),
        ("/v1/completions", {"model": "m", "prompt": ["a", "b"], "max_tokens": 3}, True),
        ("/v1/completions", {"model": "m", "prompt": "a", "max_tokens": []}, False),
        ("/v1/embeddings", {"model": "m", "input": "hi"}, True),
    ],
)
def test_request_bodies_validate_as_the_server_decodes_them(document, path, body, valid):
    operation = document["paths"][path]["post"]
    schema = {**operation["requestBody"]["content"]["application/json"]["schema"], "components": document["components"]}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(body))
    assert (not errors) == valid, errors
