"""Property-based fuzzing of request handling: bytes in, well-formed OpenAI answers out.

Each test drives the real `protocol.App` with hypothesis-generated requests (`fuzz.strategies`)
and a scripted fake engine (`fuzz.engine_driver`), and checks the answer with `fuzz.oracle`:

- nothing raises, and the call follows the runtime contract (one status, body, end);
- the answer is a success shaped like vLLM's (JSON, or SSE frames ending in `data: [DONE]` with one
  finish_reason per choice, usage matching the tokens the engine produced) or an OpenAI-shaped
  error with status == code, never a 5xx for client input; an engine `Failed` keeps its status
  (or becomes an SSE error frame once the stream has started);
- streamed and non-streamed answers to the same request and the same engine tokens agree;
- chat content parts carrying media (image URLs inline or fetched, audio, video, the Python-only
  parts, broken ones) reach a vision model as one placed `MediaInput` each, or are refused with a
  400 naming the part; a text-only model refuses them (`fuzz.oracle.check_media`).

The number of examples comes from `FUZZ_EXAMPLES` (default 2000; `make fuzz` runs 50000); each test
asserts it exercised at least that many requests.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from fuzz import harness
from fuzz.engine_driver import EngineScript, engine_scripts
from fuzz.jsontext import dumps
from fuzz.oracle import Answer, check_exchange, expect
from fuzz.strategies import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    FuzzRequest,
    any_requests,
    garbage_requests,
    media_requests,
    polite_headers,
    pooling_requests,
    valid_chat_bodies,
    valid_completion_bodies,
)
from protocol.app import OPEN_PATHS

EXAMPLES = harness.EXAMPLES
SMALLER = max(EXAMPLES // 4, 50)  # for the narrower properties, which cost two requests each


def _assert_exercised(family_before: int, at_least: int) -> None:
    done = sum(harness.EXERCISED.values()) - family_before
    assert done >= at_least, f"only {done} requests exercised, expected at least {at_least}"


# ---------------------------------------------------------------------------------------------


# (app, expectations, requests): the text model twice as often as each vision app, whose requests
# carry image parts in valid bodies too
SERVERS = [
    (harness.APP, harness.EXPECTATIONS, any_requests(harness.PROFILE)),
    (harness.APP, harness.EXPECTATIONS, any_requests(harness.PROFILE)),
    (harness.APP_WITH_OPTIONS, harness.EXPECTATIONS_WITH_OPTIONS, any_requests(harness.PROFILE)),
    (harness.VISION_APP, harness.VISION_EXPECTATIONS, any_requests(harness.VISION_PROFILE)),
    (
        harness.VISION_APP_WITH_OPTIONS,
        harness.VISION_EXPECTATIONS_WITH_OPTIONS,
        any_requests(harness.VISION_LIMITED_PROFILE),
    ),
]
SERVED_REQUESTS = st.sampled_from(SERVERS).flatmap(lambda server: st.tuples(st.just(server[:2]), server[2]))


@harness.fuzz_settings(EXAMPLES)
@given(served=SERVED_REQUESTS, script=engine_scripts())
def _every_request_is_answered_well(served: Any, script: EngineScript) -> None:
    (app, expectations), request = served
    transcript = harness.exchange(request, script, app)
    check_exchange(request, transcript, expectations)


def test_every_request_is_answered_well_formed() -> None:
    """Valid, almost-valid and garbage requests, to a text-only and a vision model: a shaped success
    or a shaped 4xx, never a crash or 5xx."""
    before = sum(harness.EXERCISED.values())
    _every_request_is_answered_well()
    _assert_exercised(before, EXAMPLES)


# ---------------------------------------------------------------------------------------------


MEDIA_REQUESTS = st.sampled_from(
    [
        (harness.APP, harness.EXPECTATIONS, media_requests(harness.PROFILE)),
        (harness.VISION_APP, harness.VISION_EXPECTATIONS, media_requests(harness.VISION_PROFILE)),
        (
            harness.VISION_APP_WITH_OPTIONS,
            harness.VISION_EXPECTATIONS_WITH_OPTIONS,
            media_requests(harness.VISION_LIMITED_PROFILE),
        ),
    ]
).flatmap(lambda server: st.tuples(st.just(server[:2]), server[2]))


@harness.fuzz_settings(SMALLER)
@given(served=MEDIA_REQUESTS, script=engine_scripts())
def _media_requests_are_answered_well(served: Any, script: EngineScript) -> None:
    (app, expectations), request = served
    transcript = harness.exchange(request, script, app)
    check_exchange(request, transcript, expectations)


def test_media_requests_are_answered_well_formed() -> None:
    """Chats with media parts of every shape, valid and broken, inline and fetched (answered with
    images, garbage or failures), to a text-only and two vision servers: placed media items or a
    400 naming the part, never a 5xx but injected ones."""
    before = sum(harness.EXERCISED.values())
    _media_requests_are_answered_well()
    _assert_exercised(before, SMALLER)


# ---------------------------------------------------------------------------------------------


POOLING_SERVERS = st.sampled_from(
    [
        (harness.POOLING_APP, harness.POOLING_EXPECTATIONS),
        (harness.POOLING_APP_WITH_OPTIONS, harness.POOLING_EXPECTATIONS_WITH_OPTIONS),
    ]
)


@harness.fuzz_settings(SMALLER)
@given(request=pooling_requests(harness.POOLING_PROFILE), script=engine_scripts(), server=POOLING_SERVERS)
def _pooling_requests_are_answered_well(request: FuzzRequest, script: EngineScript, server: Any) -> None:
    app, expectations = server
    transcript = harness.exchange(request, script, app)
    check_exchange(request, transcript, expectations)


def test_pooling_requests_are_answered_well_formed() -> None:
    """Embeddings, pooling, classify, score and rerank bodies against embedding, cross-encoder and
    per-token models: vLLM's shapes with the engine's values and exact usage, or a shaped 4xx."""
    before = sum(harness.EXERCISED.values())
    _pooling_requests_are_answered_well()
    _assert_exercised(before, SMALLER)


# ---------------------------------------------------------------------------------------------


def _authorized(request: FuzzRequest) -> bool:
    values = [value for name, value in request.headers if name == b"authorization"]
    if not values:
        return False
    scheme, _, token = values[-1].decode("latin-1").strip().partition(" ")
    return scheme.lower() == "bearer" and token.strip() == harness.API_KEY


@harness.fuzz_settings(SMALLER)
@given(
    request=st.one_of(
        any_requests(harness.PROFILE), garbage_requests(harness.PROFILE), pooling_requests(harness.PROFILE)
    ),
    script=engine_scripts(),
)
def _api_key_guards_every_model_route(request: FuzzRequest, script: EngineScript) -> None:
    transcript = harness.exchange(request, script, harness.APP_WITH_KEY)
    check_exchange(request, transcript, harness.EXPECTATIONS)
    path = request.path.split("?", 1)[0]
    if path not in OPEN_PATHS and request.method.upper() != "OPTIONS" and not _authorized(request):
        expect(
            transcript.status == 401, f"{request.method} {path} without the key answered {transcript.status}"
        )
        reached = transcript.generates or transcript.encodes
        expect(not reached, f"{request.method} {path} without the key reached the engine")


def test_api_key_guards_every_model_route() -> None:
    """With --api-key, every path but /health, /ping and /version answers 401 to anything without the
    right bearer token, and nothing of it reaches the engine; the rest stays well-formed."""
    before = sum(harness.EXERCISED.values())
    _api_key_guards_every_model_route()
    _assert_exercised(before, SMALLER)


# ---------------------------------------------------------------------------------------------


def _variant(body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    body = {
        key: value
        for key, value in body.items()
        if key not in ("stream", "stream_options", "prompt_logprobs")
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _tool_calls(choice: Any, *, streamed: bool) -> list[tuple[str | None, str]]:
    """(name, arguments) per tool call; stream deltas are joined by their `index`."""
    if not streamed:
        return [(call["function"]["name"], call["function"]["arguments"]) for call in choice.tool_calls]
    joined: dict[int, list[Any]] = {}
    for delta in choice.tool_calls:
        entry = joined.setdefault(delta.get("index", 0), [None, ""])
        function = delta.get("function") or {}
        if function.get("name"):
            entry[0] = function["name"]
        entry[1] += function.get("arguments") or ""
    return [(name, arguments) for name, arguments in (joined[key] for key in sorted(joined))]


def _summary(answer: Answer, *, streamed: bool) -> dict[int, tuple[Any, ...]]:
    return {
        index: (
            choice.text,
            choice.role,
            choice.finish_reason,
            choice.stop_reason,
            choice.logprob_tokens,
            choice.reasoning,
            _tool_calls(choice, streamed=streamed),
        )
        for index, choice in answer.choices.items()
    }


def _usage(answer: Answer) -> dict[str, Any]:
    """Usage without null fields (the stream's usage chunk drops them, as vLLM's does)."""
    return {key: value for key, value in (answer.usage or {}).items() if value is not None}


@harness.fuzz_settings(SMALLER)
@given(
    data=st.data(),
    chat=st.booleans(),
    vision=st.sampled_from([False, False, True]),
    script=engine_scripts(failures=False, disconnects=False),
)
def _stream_agrees_with_whole(data: st.DataObject, chat: bool, vision: bool, script: EngineScript) -> None:
    # the vision model's chats carry images, inline and fetched (the same answers both times)
    app, expectations, profile = (
        (harness.VISION_APP, harness.VISION_EXPECTATIONS, harness.VISION_PROFILE)
        if vision
        else (harness.APP, harness.EXPECTATIONS, harness.PROFILE)
    )
    strategy = valid_chat_bodies(profile) if chat else valid_completion_bodies(profile)
    body = data.draw(strategy, label="body")
    headers = data.draw(polite_headers(), label="headers")
    path = CHAT_PATH if chat else COMPLETIONS_PATH
    answers = []
    for stream in (False, True):
        variant = _variant(body, stream=stream)
        request = FuzzRequest("POST", path, headers, dumps(variant), "valid", variant)
        transcript = harness.exchange(request, script, app)
        answers.append((transcript, check_exchange(request, transcript, expectations)))
    (whole_t, whole), (stream_t, streamed) = answers
    expect(
        whole_t.status == stream_t.status,
        f"non-stream answered {whole_t.status}, stream answered {stream_t.status}",
        whole_t.body[:500],
        stream_t.body[:500],
    )
    if whole is None or streamed is None:
        expect(
            whole_t.body == stream_t.body, "the two errors differ", whole_t.body[:500], stream_t.body[:500]
        )
        return
    expect(
        _summary(whole, streamed=False) == _summary(streamed, streamed=True),
        "streamed and whole answers differ",
        _summary(whole, streamed=False),
        _summary(streamed, streamed=True),
    )
    expect(_usage(whole) == _usage(streamed), "usage differs", whole.usage, streamed.usage)


def test_stream_and_whole_answers_agree() -> None:
    """The same request and engine tokens give the same choices, text, finish reasons and usage either way."""
    before = sum(harness.EXERCISED.values())
    _stream_agrees_with_whole()
    _assert_exercised(before, 2 * SMALLER)
