"""Every field value the reference calls invalid is a 400 (404 for an unknown model), OpenAI-shaped.

The same lists feed the almost-valid generator; here each one is pinned on a minimal body so a
regression names the exact field.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from fuzz import harness
from fuzz.oracle import check_exchange
from fuzz.strategies import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    FuzzRequest,
    pooling_rejections,
    rejected_combinations,
)

CASES = [
    pytest.param(
        CHAT_PATH,
        {"messages": [{"role": "user", "content": "hi"}], **combo},
        id=f"chat-{json.dumps(combo)[:60]}",
    )
    for combo in rejected_combinations(harness.PROFILE, chat=True)
] + [
    pytest.param(COMPLETIONS_PATH, {"prompt": "hi", **combo}, id=f"completions-{json.dumps(combo)[:60]}")
    for combo in rejected_combinations(harness.PROFILE, chat=False)
]


@pytest.mark.parametrize(("path", "body"), CASES)
def test_invalid_fields_are_client_errors(path: str, body: dict[str, Any]) -> None:
    request = FuzzRequest(
        "POST", path, ((b"content-type", b"application/json"),), json.dumps(body).encode(), "almost", body
    )
    transcript = harness.run_request(request)
    check_exchange(request, transcript, harness.EXPECTATIONS)
    assert transcript.status == (404 if body.get("model") else 400), transcript.body[:300]


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        pytest.param(path, body, words, id=f"{path}-{json.dumps(body)[:60]}")
        for path, body, words in pooling_rejections(harness.POOLING_PROFILE)
    ],
)
def test_invalid_pooling_requests_are_client_errors(path: str, body: dict[str, Any], words: str) -> None:
    """The pooling endpoints' rules (reference §2 and the validators vLLM runs), against the pooling server."""
    request = FuzzRequest(
        "POST", path, ((b"content-type", b"application/json"),), json.dumps(body).encode(), "almost", body
    )
    transcript = harness.run_request(request, app=harness.POOLING_APP)
    check_exchange(request, transcript, harness.POOLING_EXPECTATIONS)
    assert transcript.status == 400, transcript.body[:300]
    assert words in json.loads(transcript.body)["error"]["message"], transcript.body[:300]
