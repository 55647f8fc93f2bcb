"""The fuzz oracle and fake engine catch what they claim to (so a green fuzz run means something)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from fuzz import harness, media_samples
from fuzz.engine_driver import DriverError, EngineScript, FakeEngine, Transcript
from fuzz.harness import EXPECTATIONS
from fuzz.oracle import OracleError, check_exchange
from fuzz.strategies import CHAT_PATH, COMPLETIONS_PATH, FuzzRequest
from protocol import (
    Abort,
    Body,
    Encode,
    EndResponse,
    Event,
    Failed,
    Generate,
    PoolingParams,
    SamplingParams,
    StartResponse,
    Submit,
    Tokens,
)
from protocol.outputs import Output

JSON = ((b"content-type", b"application/json"),)
SSE = ((b"content-type", b"text/event-stream"),)


def _request(body: dict, path: str = COMPLETIONS_PATH) -> FuzzRequest:
    return FuzzRequest("POST", path, JSON, json.dumps(body).encode(), "valid", body)


def _answered(status: int, body: bytes, headers=JSON, failed: Failed | None = None) -> Transcript:
    return Transcript(status=status, headers=headers, body=body, ended=True, failed=failed)


def _error(status: int) -> bytes:
    return json.dumps({"error": {"message": "m", "type": "T", "param": None, "code": status}}).encode()


def test_an_openai_error_passes_and_a_bare_500_fails() -> None:
    check_exchange(_request({"prompt": "x"}), _answered(400, _error(400)), EXPECTATIONS)
    with pytest.raises(OracleError, match="5xx"):
        check_exchange(_request({"prompt": "x"}), _answered(500, _error(500)), EXPECTATIONS)


def test_an_engine_failure_must_keep_its_status() -> None:
    failed = Failed("r", 503, "busy")
    check_exchange(_request({"prompt": "x"}), _answered(503, _error(503), failed=failed), EXPECTATIONS)
    with pytest.raises(OracleError):
        check_exchange(_request({"prompt": "x"}), _answered(500, _error(500), failed=failed), EXPECTATIONS)


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"message": "m", "type": "T", "code": 400}}',  # no param
        b'{"error": {"message": "m", "type": "T", "param": null, "code": 422}}',  # code != status
        b'{"message": "flat"}',
        b"not json",
    ],
)
def test_malformed_error_bodies_fail(body: bytes) -> None:
    with pytest.raises(OracleError):
        check_exchange(_request({"prompt": "x"}), _answered(400, body), EXPECTATIONS)


def _chunk(index: int, text: str, finish: str | None = None) -> bytes:
    payload = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": EXPECTATIONS.served_name,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_streams_need_done_and_one_finish_reason_per_choice() -> None:
    request = _request({"prompt": "x", "stream": True})
    good = _chunk(0, "a") + _chunk(0, "b", "stop") + b"data: [DONE]\n\n"
    check_exchange(request, _answered(200, good, SSE), EXPECTATIONS)
    for bad in (
        _chunk(0, "a") + _chunk(0, "b", "stop"),  # no [DONE]
        _chunk(0, "a", "stop") + _chunk(0, "b", "stop") + b"data: [DONE]\n\n",  # two finish reasons
        _chunk(0, "a") + b"data: [DONE]\n\n",  # never finished
        _chunk(0, "a") + b"data: {broken\n\n" + _chunk(0, "b", "stop") + b"data: [DONE]\n\n",
    ):
        with pytest.raises(OracleError):
            check_exchange(request, _answered(200, bad, SSE), EXPECTATIONS)


def test_non_finite_numbers_in_a_response_fail() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": EXPECTATIONS.served_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    request = _request({"messages": [{"role": "user", "content": "x"}]}, CHAT_PATH)
    check_exchange(request, _answered(200, json.dumps(body).encode()), EXPECTATIONS)
    body["choices"][0]["logprobs"] = {
        "content": [{"token": "h", "logprob": float("-inf"), "top_logprobs": []}]
    }
    with pytest.raises(OracleError, match="strict JSON"):
        check_exchange(request, _answered(200, json.dumps(body).encode()), EXPECTATIONS)


# ---- the fake engine ----


class _ScriptedCall:
    """A minimal call: submits one Generate and ends when its samples end (or never, if told so)."""

    def __init__(
        self, params: SamplingParams, *, abort_index_after_first: int | None = None, hang: bool = False
    ):
        self.generate = Generate("req", (1, 2, 3), params)
        self.events: list[Event] = []
        self.abort_index = abort_index_after_first
        self.hang = hang
        self.finished_indexes: set[int] = set()
        self._done = False

    def start(self) -> list[Output]:
        return [Submit((self.generate,))]

    def feed(self, events: Sequence[Event]) -> list[Output]:
        self.events.extend(events)
        outputs: list[Output] = []
        for event in events:
            if isinstance(event, Tokens) and event.finish_reason is not None:
                self.finished_indexes.add(event.index)
        if self.abort_index is not None:
            outputs.append(Submit((Abort("req", self.abort_index),)))
            self.finished_indexes.add(self.abort_index)
            self.abort_index = None
        if len(self.finished_indexes) == self.generate.params.n and not self.hang:
            self._done = True
            outputs += [StartResponse(200, JSON), Body(b"{}"), EndResponse()]
        return outputs

    def disconnected(self) -> list:
        return [Abort("req")]

    @property
    def finished(self) -> bool:
        return self._done


ENGINE = FakeEngine(vocab_size=260, special_ids=frozenset({256, 257}), eos_ids=frozenset({257}))


def test_the_engine_sends_logprobs_in_the_requested_shape() -> None:
    call = _ScriptedCall(SamplingParams(max_tokens=5, n=2, logprobs=3, prompt_logprobs=1))
    transcript = ENGINE.run(call, EngineScript(seed=7))
    tokens = [event for event in call.events if isinstance(event, Tokens)]
    assert {event.index for event in tokens} == {0, 1}
    for event in tokens:
        assert event.logprobs is not None and len(event.logprobs) == len(event.token_ids)
        for entry, token in zip(event.logprobs, event.token_ids, strict=True):
            assert entry.token_id == token and len(entry.top) == 3
            assert [logprob for _, logprob in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
            if entry.rank <= 3:
                assert entry.top[entry.rank - 1] == (token, entry.logprob)
    firsts = {}
    for event in tokens:
        firsts.setdefault(event.index, event)
    assert all(
        event.prompt_logprobs is not None and event.prompt_logprobs[0] is None for event in firsts.values()
    )
    assert sum(len(ids) for ids in transcript.tokens.values()) == sum(
        len(event.token_ids) for event in tokens
    )


def test_the_engine_stops_an_aborted_sample() -> None:
    call = _ScriptedCall(SamplingParams(max_tokens=20, n=2, temperature=1.0), abort_index_after_first=1)
    ENGINE.run(call, EngineScript(seed=3, max_chunk=1))
    after_first_step = call.events[2:]
    assert all(event.index == 0 for event in after_first_step if isinstance(event, Tokens))


def test_a_call_that_waits_for_nothing_is_reported() -> None:
    with pytest.raises(DriverError, match="waits for engine events"):
        ENGINE.run(_ScriptedCall(SamplingParams(max_tokens=2), hang=True), EngineScript(seed=1))


def test_an_injected_failure_reaches_the_call() -> None:
    call = _ScriptedCall(SamplingParams(max_tokens=4))
    with pytest.raises(DriverError):
        # the failure kills the only request, so the call (which ignores Failed) waits for nothing
        ENGINE.run(call, EngineScript(seed=1, failure="before", failure_status=503))
    assert call.events == [Failed("req", 503, "injected engine failure 503")]


# ---- the pooling endpoints ----


def _pooling_exchange(path: str, body: dict, script: EngineScript = EngineScript(seed=5)):
    request = FuzzRequest("POST", path, JSON, json.dumps(body).encode(), "pooling", body)
    return request, harness.run_request(request, script, harness.POOLING_APP)


def _tampered(transcript: Transcript, change) -> Transcript:
    payload = json.loads(transcript.body)
    change(payload)
    return dataclasses.replace(transcript, body=json.dumps(payload).encode())


def test_a_real_pooling_answer_passes_and_tampered_ones_fail() -> None:
    request, transcript = _pooling_exchange("/v1/embeddings", {"model": "tiny-embed", "input": ["a", "bc"]})
    check_exchange(request, transcript, harness.POOLING_EXPECTATIONS)
    assert len(transcript.pooled) == 2
    for change in (
        lambda p: p["usage"].update(prompt_tokens=1),
        lambda p: p["data"].reverse(),
        lambda p: p["data"][0]["embedding"].append(0.5),
        lambda p: p.update(model="tiny-cross"),
    ):
        with pytest.raises(OracleError):
            check_exchange(request, _tampered(transcript, change), harness.POOLING_EXPECTATIONS)


def test_base64_answers_are_checked_against_the_engines_vector() -> None:
    body = {"model": "tiny-embed", "input": "a", "encoding_format": "base64", "embed_dtype": "bfloat16"}
    request, transcript = _pooling_exchange("/v1/embeddings", body)
    check_exchange(request, transcript, harness.POOLING_EXPECTATIONS)
    flipped = _tampered(transcript, lambda p: p["data"][0].update(embedding="AAAAAAAAAAA="))
    with pytest.raises(OracleError):
        check_exchange(request, flipped, harness.POOLING_EXPECTATIONS)


def test_rerank_answers_must_be_sorted_and_cut() -> None:
    body = {"model": "tiny-cross", "query": "q", "documents": ["a", "b", "c"], "top_n": 2}
    request, transcript = _pooling_exchange("/rerank", body)
    check_exchange(request, transcript, harness.POOLING_EXPECTATIONS)
    for change in (
        lambda p: p["results"].reverse(),
        lambda p: p["results"].pop(),
        lambda p: p["results"][0].pop("document"),
        lambda p: p.pop("meta"),
    ):
        with pytest.raises(OracleError):
            check_exchange(request, _tampered(transcript, change), harness.POOLING_EXPECTATIONS)


def test_a_pooling_failure_must_keep_its_status_even_after_some_outputs() -> None:
    request, transcript = _pooling_exchange("/classify", {"model": "tiny-cross", "input": ["a", "b"]})
    failed = Failed(transcript.encodes[0].request_id, 503, "busy")
    answered = dataclasses.replace(
        transcript, status=500, body=_error(500), failed=failed, output_before_failure=True
    )
    with pytest.raises(OracleError):
        check_exchange(request, answered, harness.POOLING_EXPECTATIONS)


class _ForgetfulEncodeCall:
    """Submits two Encodes and, on disconnect, aborts only the first: the driver must notice."""

    def __init__(self) -> None:
        self.params = PoolingParams()
        self._done = False

    def start(self) -> list[Output]:
        return [Submit((Encode("e0", (1,), self.params), Encode("e1", (2,), self.params)))]

    def feed(self, events: Sequence[Event]) -> list[Output]:
        return []

    def disconnected(self) -> list:
        self._done = True
        return [Abort("e0")]

    @property
    def finished(self) -> bool:
        return self._done


def test_the_engine_reports_encodes_left_running() -> None:
    with pytest.raises(DriverError, match="running encodes"):
        ENGINE.run(_ForgetfulEncodeCall(), EngineScript(seed=1, disconnect_step=0))


def test_the_engine_answers_token_tasks_with_rows() -> None:
    request, transcript = _pooling_exchange(
        "/pooling", {"model": "tiny-tokens", "input": "abc", "task": "token_classify"}
    )
    check_exchange(request, transcript, harness.POOLING_EXPECTATIONS)
    (pooled,) = transcript.pooled.values()
    assert len(pooled.data) == 4 and all(len(row) == 4 for row in pooled.data)


# ---------------------------------------------------------------------------------------------
# media parts


def _image_chat(*urls: str, **body: Any) -> FuzzRequest:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    payload = {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}], **body}
    return FuzzRequest("POST", CHAT_PATH, JSON, json.dumps(payload).encode(), "valid", payload)


PNG_URL = media_samples.image_data_urls()["png"]
GIF_URL = media_samples.image_data_urls()["gif"]


def test_the_driver_answers_a_fetch_and_a_vision_answer_passes() -> None:
    request = _image_chat("https://example.com/a.png", PNG_URL, "https://example.com/b.gif")
    script = EngineScript(fetch_answers=("png", "gif"))
    transcript = harness.run_request(request, script, harness.VISION_APP)
    assert transcript.status == 200
    assert [(f.key, f.url) for f in transcript.fetches] == [
        (0, "https://example.com/a.png"),
        (2, "https://example.com/b.gif"),
    ]
    (generate,) = transcript.generates
    assert (
        len(generate.media) == 3
        and generate.media[0].hash == generate.media[1].hash != generate.media[2].hash
    )
    check_exchange(request, transcript, harness.VISION_EXPECTATIONS)


def test_a_failed_fetch_is_a_400_naming_the_part_and_a_client_may_leave_during_it() -> None:
    request = _image_chat(PNG_URL, "http://example.com/x.png")
    transcript = harness.run_request(request, EngineScript(fetch_answers=("failed",)), harness.VISION_APP)
    assert transcript.status == 400 and b"messages[0].content[1]: HTTP 404" in transcript.body
    check_exchange(request, transcript, harness.VISION_EXPECTATIONS)
    left = harness.run_request(request, EngineScript(disconnect_step=0), harness.VISION_APP)
    assert left.fetch_pending and left.disconnected and not left.generates
    check_exchange(request, left, harness.VISION_EXPECTATIONS)


def _generate_with(transcript: Transcript, **change: Any) -> Transcript:
    (generate,) = transcript.generates
    return dataclasses.replace(transcript, generates=[msgspec.structs.replace(generate, **change)])


def test_media_in_the_engine_work_must_be_placed_and_counted() -> None:
    request = _image_chat(PNG_URL, GIF_URL)
    transcript = harness.run_request(request, EngineScript(), harness.VISION_APP)
    check_exchange(request, transcript, harness.VISION_EXPECTATIONS)
    first, second = transcript.generates[0].media
    tampered = [
        {"media": (first,)},  # one item for two parts
        {"media": (second, first)},  # out of order
        {"media": (first, msgspec.structs.replace(second, offset=second.offset - 1))},  # off its run
        {"media": (first, msgspec.structs.replace(second, data=second.data[:-3]))},  # short pixels
        {"media": (first, msgspec.structs.replace(second, hash=first.hash))},  # different pixels, one hash
    ]
    for change in tampered:
        with pytest.raises(OracleError):
            check_exchange(request, _generate_with(transcript, **change), harness.VISION_EXPECTATIONS)
    with pytest.raises(OracleError, match="text-only model was sent media"):
        check_exchange(request, transcript, EXPECTATIONS)


def test_media_answers_are_held_to_the_media_rules() -> None:
    request = _image_chat("https://example.com/a.png")
    fetched = harness.run_request(request, EngineScript(fetch_answers=("png",)), harness.VISION_APP)
    failed = harness.run_request(request, EngineScript(fetch_answers=("failed",)), harness.VISION_APP)
    error = json.dumps(
        {"error": {"message": "messages[0].content[0]: no", "type": "T", "param": "messages", "code": 400}}
    ).encode()
    # a sample image refused, a failed fetch answered 200, an error after a fetch not naming a part
    cases = [
        (dataclasses.replace(fetched, status=400, body=error, generates=[]), "sample"),
        (
            dataclasses.replace(failed, status=200, body=fetched.body, generates=fetched.generates),
            "fetch failed",
        ),
        (dataclasses.replace(failed, body=_error(400)), "400 naming a part"),
        (dataclasses.replace(failed, body=error.replace(b'"messages"', b'"model"')), "param 'messages'"),
    ]
    for transcript, said in cases:
        with pytest.raises(OracleError, match=said):
            check_exchange(request, transcript, harness.VISION_EXPECTATIONS)
    text_only = harness.run_request(_image_chat(PNG_URL), EngineScript(), harness.APP)
    assert text_only.status == 400 and not text_only.generates
    with pytest.raises(OracleError, match="text-only model must refuse"):
        check_exchange(_image_chat(PNG_URL), dataclasses.replace(text_only, status=200), EXPECTATIONS)
