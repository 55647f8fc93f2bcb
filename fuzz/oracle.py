"""What a response must look like, checked against the request and what the fake engine did.

`check_exchange` is the property every fuzzed request must satisfy: the answer is an
OpenAI-shaped error (4xx, status == code; a 5xx only as the status of a `Failed` the engine
injected) or a success shaped like the reference (a JSON body, or a well-formed SSE stream ending
in `data: [DONE]`), consistent with the token ids the engine produced. `Answer` is the parsed,
mode-independent view of a success (text, finish reason, logprob tokens and usage per choice),
which the stream/non-stream agreement property compares.

JSON is parsed strictly here: `NaN`/`Infinity` in a response (say, an unclamped -inf logprob) is
a failure, although Python's `json` module would accept it.

Media (`check_media`): a text-only model never fetches nor receives media, and never answers a 200
to a chat whose messages hold media parts. For a vision model every `Generate` carries one
`MediaInput` per media part, in order, each on its own run of placeholder tokens with pixels of
the crop's size (`check_media_commands`); equal samples hash equal and different ones differ; a
URL is fetched only for an http(s)/file part, with its part's index as key. After a fetch, the
answer is a 200 or a 400 (param "messages") naming a part; a failed or unusable fetch is never a
200, and a sample image (inline or fetched) is never the part a 400 names.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fuzz import media_samples
from fuzz.engine_driver import Transcript
from fuzz.strategies import (
    CHAT_PATH,
    CLASSIFY_PATH,
    COMPLETIONS_PATH,
    EMBEDDINGS_PATH,
    MEDIA_KEYS,
    MEDIA_PART_TYPES,
    POOLING_PATH,
    POOLING_PATHS,
    PYTHON_ONLY_PART_TYPES,
    RERANK_PATHS,
    SCORE_PATHS,
    FuzzRequest,
)
from protocol.engine_api import Encode, Generate, MediaInput
from protocol.media.fetch import FetchResult, MediaFetched, MediaRequest
from protocol.media.spec import MultimodalSpec
from protocol.model import ServedModel
from protocol.tokenizer import Tokenizer

FINISH_REASONS = {"stop", "length", "tool_calls", "abort"}
MIN_LOGPROB = -9999.0


class OracleError(AssertionError):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json(data: bytes | str) -> Any:
    """Parse JSON as a strict client would (no NaN/Infinity)."""
    return json.loads(data, parse_constant=_reject_constant)


def request_json(request: FuzzRequest) -> dict[str, Any] | None:
    """The request body as the server would read it, when it is a JSON object."""
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


# What a leaked Python exception looks like in a response body: a traceback, its frame lines, or
# the repr/str of an internal error. A marker only counts when the request did not carry it (an
# error message may quote the client's input).
_LEAK_PATTERNS = (
    re.compile(rb"Traceback \(most recent call last\)"),
    re.compile(rb'File "[^"]*", line \d+'),
    re.compile(rb"\b[A-Z][A-Za-z]*(?:Error|Exception)\((?:'|\"|\)|\d)"),  # ValueError('x'), KeyError(3)
    re.compile(rb"<(?:class|function|built-in method|bound method) [^>]*>"),
    re.compile(rb"\bobject at 0x[0-9a-f]+"),
    re.compile(
        rb"object has no attribute|object is not (?:subscriptable|iterable|callable)|unhashable type"
        rb"|unsupported operand type|takes \d+ positional argument|referenced before assignment"
    ),
)


def traceback_leak(body: bytes, sent: bytes = b"") -> str | None:
    """The first sign of a Python exception in `body` that is not in `sent` (the request), if any."""
    for pattern in _LEAK_PATTERNS:
        for match in pattern.finditer(body):
            if match.group() not in sent:
                return match.group().decode("latin-1")
    return None


def expect(condition: Any, message: str, *context: Any) -> None:
    if not condition:
        detail = "".join(f"\n  {item!r}"[:2000] for item in context)
        raise OracleError(message + detail)


# ---------------------------------------------------------------------------------------------
# parsed view of a successful completion


@dataclass
class Choice:
    index: int
    text: str = ""
    role: str | None = None
    finish_reason: str | None = None
    stop_reason: Any = None
    logprob_tokens: list[str] | None = None
    tool_calls: list[Any] = field(default_factory=list)
    reasoning: str = ""
    token_ids: list[int] | None = None  # with return_token_ids (whole responses only)
    prompt_logprobs: Any = None  # completions: per choice (whole responses only)


@dataclass
class Answer:
    """A successful chat/completions answer, independent of streaming."""

    id: str
    model: str
    choices: dict[int, Choice]
    usage: dict[str, Any] | None
    error: dict[str, Any] | None = None  # an SSE error frame, if one came
    prompt_logprobs: Any = None  # chat: for the whole response (whole responses only)


# ---------------------------------------------------------------------------------------------
# the property


@dataclass(frozen=True)
class Expectations:
    """What the oracle knows about the server configuration."""

    served_name: str
    tokenizer: Tokenizer
    force_include_usage: bool = False  # --enable-force-include-usage
    request_id_headers: bool = False  # --enable-request-id-headers: X-Request-Id on every response
    models: Mapping[str, ServedModel] = field(default_factory=dict)  # the pooling server's models, by name
    multimodal: MultimodalSpec | None = None  # the chat model's media (None: a text-only model)
    media_limit: int | None = None  # --limit-mm-per-prompt for images, when the server sets one


def check_exchange(request: FuzzRequest, transcript: Transcript, expectations: Expectations) -> Answer | None:
    """Assert the response is a well-formed error or success; return the parsed success, if any."""
    check_media_commands(
        [*transcript.generates, *transcript.encodes], expectations.multimodal, chat=request.path == CHAT_PATH
    )
    if transcript.disconnected and not transcript.ended:
        return None  # the client left; nothing more was owed to it
    leak = traceback_leak(transcript.body, request.body)
    expect(leak is None, f"the response carries a Python exception: {leak!r}", transcript.body[:2000])
    expect(transcript.status is not None, "the call finished without a status")
    expect(transcript.ended, "the response was never ended")
    status = transcript.status
    assert status is not None
    failed = transcript.failed
    for name, value in transcript.headers:
        expect(
            isinstance(name, bytes) and isinstance(value, bytes),
            "headers must be bytes pairs",
            transcript.headers,
        )
    if expectations.request_id_headers:
        echoed = transcript.header(b"x-request-id")
        expect(
            echoed, "--enable-request-id-headers, but the response has no X-Request-Id", transcript.headers
        )
        sent = _last_header(request, b"x-request-id")
        if sent:
            expect(echoed == sent, f"X-Request-Id {sent!r} came back as {echoed!r}")
    pooling = request.method == "POST" and request.path in POOLING_PATHS
    check_media(request, transcript, expectations)
    if status >= 400:
        _check_error_response(status, transcript, expectations)
        if failed is not None and (pooling or not transcript.output_before_failure):
            # a pooling answer is sent only once every input is in, so it always keeps the status
            expect(
                status == failed.status,
                f"engine failed with {failed.status} before any output, answered {status}",
            )
        return None
    expect(200 <= status < 300, f"unexpected status {status}")
    if failed is not None:
        # A failure is a success only for a stream that had started: then it ends with an error frame.
        expect(
            transcript.output_before_failure and _is_sse(transcript),
            f"engine failed with {failed.status} but the answer is {status}",
            transcript.body[:500],
        )
    if request.method == "POST" and request.path in (CHAT_PATH, COMPLETIONS_PATH):
        return _check_completion_success(request, transcript, expectations)
    if pooling:
        expect(
            failed is None, f"the engine failed with {failed and failed.status}, but the answer is {status}"
        )
        _check_pooling_success(request, transcript, expectations)
        return None
    if request.method == "POST" and request.path in ("/tokenize", "/detokenize"):
        _check_tokenizer_success(request, transcript, expectations)
        return None
    _check_other_success(transcript)
    return None


def _is_sse(transcript: Transcript) -> bool:
    content_type = transcript.header(b"content-type") or b""
    return content_type.split(b";")[0].strip().lower() == b"text/event-stream"


def _check_error_body(payload: Any, status: int, where: str) -> dict[str, Any]:
    expect(isinstance(payload, dict) and set(payload) == {"error"}, f"{where}: not an error object", payload)
    error = payload["error"]
    expect(isinstance(error, dict), f"{where}: `error` is not an object", payload)
    expect(
        set(error) >= {"message", "type", "param", "code"},
        f"{where}: error lacks message/type/param/code",
        payload,
    )
    expect(isinstance(error["message"], str) and error["message"], f"{where}: empty error message", payload)
    expect(isinstance(error["type"], str) and error["type"], f"{where}: empty error type", payload)
    expect(error["param"] is None or isinstance(error["param"], str), f"{where}: bad param", payload)
    expect(error["code"] == status, f"{where}: code {error['code']!r} != status {status}", payload)
    expect("Traceback" not in error["message"], f"{where}: traceback leaked", error["message"])
    return error


def _check_error_response(status: int, transcript: Transcript, expectations: Expectations) -> None:
    failed = transcript.failed
    if status >= 500:
        expect(
            failed is not None and failed.status == status,
            f"a {status} answer without an engine failure of that status (client input must never cause a 5xx)",
            transcript.body[:2000],
        )
    expect(status < 600, f"status {status} out of range")
    check_error_payload(transcript.body, status)


def check_error_payload(body: bytes, status: int) -> None:
    """An error response's body: an OpenAI error object whose code is the status."""
    try:
        payload = strict_json(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OracleError(f"error body is not JSON ({exc}): {body[:300]!r}") from None
    if status == 401 and payload == {"error": "Unauthorized"}:
        return  # vLLM's authentication middleware answers in this flat shape
    _check_error_body(payload, status, f"{status} error body")


def _check_tokenizer_success(
    request: FuzzRequest, transcript: Transcript, expectations: Expectations
) -> None:
    try:
        payload = strict_json(transcript.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OracleError(f"a 200 from {request.path} whose body is not JSON ({exc})") from None
    expect(isinstance(payload, dict), f"{request.path}: not an object", payload)
    if request.path == "/detokenize":
        expect(isinstance(payload.get("prompt"), str), "/detokenize: `prompt` must be a string", payload)
        return
    tokens = payload.get("tokens")
    expect(isinstance(tokens, list) and all(isinstance(t, int) for t in tokens), "/tokenize: tokens", payload)
    expect(payload.get("count") == len(tokens), "/tokenize: count != len(tokens)", payload)
    expect(
        all(0 <= t < expectations.tokenizer.vocab_size for t in tokens), "/tokenize: id out of vocab", payload
    )
    strs = payload.get("token_strs")
    if strs is not None:
        expect(isinstance(strs, list) and len(strs) == len(tokens), "/tokenize: token_strs", payload)


def _check_other_success(transcript: Transcript) -> None:
    """A 200 on another route: the body must at least be what its content type says."""
    content_type = (transcript.header(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type == b"application/json":
        try:
            strict_json(transcript.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise OracleError(f"a JSON 200 whose body is not JSON ({exc})") from None
    elif content_type == b"text/event-stream":
        _sse_payloads(transcript.body)


# ---------------------------------------------------------------------------------------------
# media parts


DEFAULT_MEDIA_LIMIT = 999  # vLLM's --limit-mm-per-prompt per modality when none is set
_IMAGE_MIME = re.compile(r"image/[!#$%&'*+\-.^_`|~0-9a-z]+")  # RFC 9110 tokens, lower-cased
_PART_WHERE = re.compile(r"messages\[(\d+)\]\.content\[(\d+)\]")


def named_part(message: Any) -> str | None:
    """The content part (`messages[i].content[j]`) an error message names, if any. A request's
    schema errors ("1 validation error for ...") may name one too, but carry no param (vLLM's
    shape): they are not the media errors this is for."""
    if not isinstance(message, str) or "validation error for" in message:
        return None
    found = _PART_WHERE.search(message)
    return found.group() if found is not None else None


def _media_type(part: Any) -> str | None:
    """The media type of a content part as the core reads it: its `type`, or without one the first
    media key it holds (a null `input_audio` does not count); None for anything else."""
    if not isinstance(part, dict):
        return None
    part_type = part.get("type")
    if part_type is None:
        return next(
            (
                key
                for key in MEDIA_KEYS
                if ((part.get(key) is not None) if key == "input_audio" else key in part)
            ),
            None,
        )
    media = (*MEDIA_PART_TYPES, *PYTHON_ONLY_PART_TYPES)
    return part_type if isinstance(part_type, str) and part_type in media else None


def media_parts(body: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The content parts of `body["messages"]` the core reads as media, in order, with where each is."""
    messages = body.get("messages")
    found: list[tuple[str, dict[str, Any]]] = []
    if not isinstance(messages, list):
        return found
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            found += [
                (f"messages[{i}].content[{j}]", part) for j, part in enumerate(content) if _media_type(part)
            ]
    return found


_URL_KEYS = {
    "image_url": "image_url",
    "input_image": "image_url",
    "audio_url": "audio_url",
    "video_url": "video_url",
}


def _part_url(part: Mapping[str, Any]) -> Any:
    """The URL a media part carries (None for input_audio, image_embeds and the Python-only parts)."""
    part_type = _media_type(part)
    key = _URL_KEYS.get(part_type) if part_type is not None else None
    value = part.get(key) if key is not None else None
    return value.get("url") if isinstance(value, dict) else value


def _fetched_url(url: Any) -> bool:
    return isinstance(url, str) and url[:5].lower() != "data:"


def _sources(parts: Sequence[tuple[str, dict[str, Any]]], fetched: Sequence[FetchResult]) -> list[str | None]:
    """Per part, which image sample it carries ("png", ...), "bad" when it was fetched and the
    runtime fed back no sample, or None when the oracle cannot tell (and for parts of other kinds)."""
    answers = {result.key: result for result in fetched}
    sources: list[str | None] = []
    for index, (_, part) in enumerate(parts):
        url = _part_url(part)
        if not isinstance(url, str) or _media_type(part) not in ("image_url", "input_image"):
            sources.append(None)
        elif not _fetched_url(url):
            data = media_samples.data_url_bytes(url)
            header = url.partition(",")[0].lower()
            mime = header[5:].split(";", 1)[0].strip()
            # a sample under a MIME type of another kind (text/plain, audio/wav) is refused rightly
            plausible = mime in ("", "application/octet-stream") or _IMAGE_MIME.fullmatch(mime) is not None
            sources.append(media_samples.sample_name(data) if data is not None and plausible else None)
        else:
            answer = answers.get(index)
            if isinstance(answer, MediaFetched):
                sources.append(media_samples.sample_name(answer.data) or "bad")
            else:
                sources.append("bad" if answer is not None else None)
    return sources


def check_media_commands(
    commands: Sequence[Generate | Encode], spec: MultimodalSpec | None, *, chat: bool = False
) -> None:
    """Every engine command's media: none for a text-only model; for a vision model, one item per
    run of placeholder ids, in order: an image on `image_tokens` of them with `crop` x `crop` RGB
    pixels, image embeddings on one per row of float32 `embeds_hidden_size` columns.

    Every placeholder id must belong to an item when there are items, or for a chat (whose core
    counts the placeholders the template and the client wrote); a completions prompt of ids may
    hold a stray one, which the engine refuses with a 400 (engine.requests.check_media)."""
    for command in commands:
        media: tuple[MediaInput, ...] = getattr(command, "media", ())
        if spec is None:
            expect(not media, "a text-only model was sent media", [(m.kind, m.offset) for m in media])
            continue
        prompt = command.prompt_token_ids
        placeholder = spec.image_token_id
        expect(
            (not media and not chat) or prompt.count(placeholder) == sum(item.length for item in media),
            f"{prompt.count(placeholder)} placeholder tokens for items of {[item.length for item in media]}",
            prompt,
        )
        end = 0
        for number, item in enumerate(media):
            where = f"media item {number}"
            _check_media_item(item, spec, where)
            expect(
                item.offset >= end,
                f"{where} at {item.offset} overlaps or precedes the one before (end {end})",
            )
            expect(
                prompt[item.offset : item.offset + item.length] == (placeholder,) * item.length,
                f"{where} is not on a run of placeholder tokens",
                prompt[item.offset : item.offset + item.length],
            )
            end = item.offset + item.length
        expect(
            len({item.hash: item.data for item in media}) == len({item.data for item in media}),
            "media items with equal content got different hashes, or different content one hash",
        )


def _check_media_item(item: MediaInput, spec: MultimodalSpec, where: str) -> None:
    """One item's shape and size for what the model takes."""
    expect(re.fullmatch(r"[0-9a-f]{64}", item.hash) is not None, f"{where}: hash {item.hash!r}")
    if item.kind == "image_embeds":
        hidden = spec.embeds_hidden_size
        expect(hidden > 0, f"{where}: embeddings for a model that takes none")
        expect(item.shape == (item.length, hidden), f"{where}: shape {item.shape} on {item.length} positions")
        expect(
            len(item.data) == 4 * item.length * hidden, f"{where}: {len(item.data)} bytes for {item.shape}"
        )
        return
    crop = (spec.image.crop_height, spec.image.crop_width, 3)
    expect(item.kind in spec.modalities, f"{where}: a {item.kind} for a model of {sorted(spec.modalities)}")
    expect(item.length == spec.image_tokens, f"{where}: {item.length} positions, not {spec.image_tokens}")
    expect(item.shape == crop, f"{where}: shape {item.shape}, the crop is {crop}")
    expect(len(item.data) == math.prod(item.shape), f"{where}: {len(item.data)} bytes for {item.shape}")


def check_fetches(parts: Sequence[tuple[str, dict[str, Any]]], fetches: Sequence[MediaRequest]) -> None:
    """A fetch asks for exactly the http(s)/file URLs of the media parts, keyed by part index."""
    if not fetches:
        return
    wanted = {
        index: _part_url(part) for index, (_, part) in enumerate(parts) if _fetched_url(_part_url(part))
    }
    asked = {request.key: request.url for request in fetches}
    expect(asked == wanted, "the call fetched other URLs than its parts' http(s)/file ones", asked, wanted)
    expect(all(request.kind == "image" for request in fetches), "a fetch of a non-image", fetches)


def check_media(request: FuzzRequest, transcript: Transcript, expectations: Expectations) -> None:
    """The media rules of a request and its answer (see the module docstring)."""
    spec = expectations.multimodal
    body = request_json(request)
    parts = media_parts(body) if body is not None and request.method == "POST" else []
    status = transcript.status
    expect(
        spec is not None or not transcript.fetches, "a text-only model asked for media", transcript.fetches
    )
    if transcript.fetches:
        expect(
            request.path == CHAT_PATH and parts,
            "a fetch for a request without media parts",
            transcript.fetches,
        )
        check_fetches(parts, transcript.fetches)
    if status is None or not parts or request.path != CHAT_PATH:
        return
    failed = transcript.failed
    if status < 300:
        expect(
            spec is not None,
            f"a {status} for media parts {[where for where, _ in parts]} (a text-only model must refuse them)",
        )
        expect(len(transcript.generates) == 1, f"a {status} from {len(transcript.generates)} Generates")
        generate = transcript.generates[0]
        limit = expectations.media_limit or DEFAULT_MEDIA_LIMIT
        expect(len(parts) <= limit, f"a {status} for {len(parts)} images, over --limit-mm-per-prompt {limit}")
        expect(
            len(generate.media) == len(parts),
            f"{len(generate.media)} media item(s) sent to the engine for {len(parts)} media part(s)",
        )
        sources = _sources(parts, transcript.fetched)
        expect("bad" not in sources, "a 200 although a fetch failed or returned no image", transcript.fetched)
        hashes: dict[str, str] = {}
        for source, item in zip(sources, generate.media, strict=True):
            if source is not None:
                expect(
                    hashes.setdefault(source, item.hash) == item.hash,
                    f"two {source} samples hashed differently",
                )
        expect(len(set(hashes.values())) == len(hashes), "different samples share a hash", hashes)
        return
    if failed is not None and status == failed.status:
        return  # the engine's failure (only reachable once every part was usable)
    try:
        payload = strict_json(transcript.body)
    except (ValueError, UnicodeDecodeError):
        return  # not an error object: check_error_payload reports it
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message", "") if isinstance(error, dict) else ""
    named = named_part(message)
    if named is not None:
        expect(
            status == 400 and error.get("param") == "messages",
            f"an error naming {named} must be a 400 with param 'messages'",
            status,
            error,
        )
    if transcript.fetches and not transcript.fetch_pending:
        expect(
            status == 400 and named is not None,
            "after its media was fetched a call may only fail with a 400 naming a part",
            status,
            error,
        )
    if spec is not None and named is not None:
        index = next((i for i, (where, _) in enumerate(parts) if where == named), None)
        if index is not None:
            source = _sources(parts, transcript.fetched)[index]
            expect(
                source in (None, "bad"),
                f"the {source} sample in {named} was refused",
                message,
                request.body[:300],
            )


# ---------------------------------------------------------------------------------------------
# chat / completions successes


def _check_completion_success(
    request: FuzzRequest, transcript: Transcript, expectations: Expectations
) -> Answer:
    body = request_json(request)
    expect(body is not None, "a 200 for a body that is not a JSON object", request.body[:300])
    assert body is not None
    chat = request.path == CHAT_PATH
    stream = bool(body.get("stream"))
    if stream:
        expect(_is_sse(transcript), "stream=true but the answer is not text/event-stream", transcript.headers)
        answer = _parse_stream(transcript, chat=chat)
    else:
        expect(
            (transcript.header(b"content-type") or b"").startswith(b"application/json"),
            "a non-streamed answer must be application/json",
            transcript.headers,
        )
        answer = _parse_whole(transcript, chat=chat)
    if answer.id or answer.error is None:  # a stream may fail before its first chunk: no envelope then
        expect(
            answer.model == expectations.served_name,
            f"model {answer.model!r} != {expectations.served_name!r}",
        )
        expect(answer.id.startswith("chatcmpl-" if chat else "cmpl-"), f"bad id {answer.id!r}")
        request_id = _last_header(request, b"x-request-id")
        if request_id:  # the X-Request-Id header is the base of the response id (vLLM's _base_request_id)
            wanted = ("chatcmpl-" if chat else "cmpl-") + request_id.decode("latin-1")
            expect(answer.id == wanted, f"id {answer.id!r} does not follow X-Request-Id ({wanted!r})")
    if answer.error is not None:
        failed = transcript.failed
        expect(failed is not None, "an SSE error frame without an engine failure", answer.error)
        assert failed is not None
        expect(
            answer.error.get("code") == failed.status, "the SSE error frame must carry the engine's status"
        )
        return answer
    _check_choices(body, answer, transcript, expectations, chat=chat, stream=stream)
    return answer


def _sample_keys(transcript: Transcript) -> dict[int, tuple[int, int]]:
    """Choice index -> (submission position, sample index): index = sample + position * n."""
    keys: dict[int, tuple[int, int]] = {}
    offset = 0
    for position, generate in enumerate(transcript.generates):
        for index in range(generate.params.n):
            keys[offset + index] = (position, index)
        offset += generate.params.n
    return keys


def _aborted(transcript: Transcript, position: int, index: int) -> bool:
    request_id = transcript.generates[position].request_id
    return any(a.request_id == request_id and a.index in (None, index) for a in transcript.aborts)


def _check_choices(
    body: dict[str, Any],
    answer: Answer,
    transcript: Transcript,
    expectations: Expectations,
    *,
    chat: bool,
    stream: bool,
) -> None:
    keys = _sample_keys(transcript)
    if transcript.generates:
        expect(
            sorted(answer.choices) == sorted(keys),
            f"choice indices {sorted(answer.choices)} != expected {sorted(keys)}",
        )
    has_stop_strings = bool(body.get("stop")) or bool(body.get("bad_words"))
    for number, choice in answer.choices.items():
        expect(
            choice.finish_reason in FINISH_REASONS, f"choice {number}: finish_reason {choice.finish_reason!r}"
        )
        if number not in keys:
            continue
        position, index = keys[number]
        engine_finish = transcript.finish.get((position, index))
        aborted = _aborted(transcript, position, index)
        if engine_finish is not None and not aborted and not has_stop_strings:
            reason, stop_reason = engine_finish
            if reason == "length":
                expect(choice.finish_reason == "length", f"choice {number}: engine said length", choice)
            else:
                expect(
                    choice.finish_reason in ("stop", "tool_calls"),
                    f"choice {number}: engine said stop",
                    choice,
                )
                if stop_reason is not None and choice.finish_reason == "stop":
                    expect(
                        choice.stop_reason == stop_reason,
                        f"choice {number}: stop_reason",
                        choice,
                        stop_reason,
                    )
        elif engine_finish is None:
            expect(
                aborted,
                f"choice {number} finished, yet the engine never finished it and the core never aborted it",
            )
        _check_stop_strings(body, choice, parsed=chat and _forced_tool_calls(body))
        if _plain_text_request(body, chat=chat):
            tokens = transcript.tokens.get((position, index), [])
            candidates = {expectations.tokenizer.decode(tokens, skip_special_tokens=True)}
            if tokens:
                candidates.add(expectations.tokenizer.decode(tokens[:-1], skip_special_tokens=True))
            expect(
                choice.text in candidates,
                f"choice {number}: text differs from the decoded tokens",
                choice,
                tokens,
            )
        _check_logprob_count(body, choice, transcript.tokens.get((position, index), []), chat=chat)
        if not stream:
            prompt = transcript.generates[position].prompt_token_ids
            _check_prompt_logprobs(body, answer.prompt_logprobs if chat else choice.prompt_logprobs, prompt)
            echo_only = body.get("max_tokens") == 0  # the engine's one token is dropped (vLLM)
            if (
                body.get("return_token_ids") is True
                and not has_stop_strings
                and not aborted
                and not echo_only
            ):
                fed = transcript.tokens.get((position, index), [])
                expect(choice.token_ids == fed, f"choice {number}: token_ids != generated ids", choice, fed)
    _check_usage(
        body,
        answer,
        transcript,
        stream=stream,
        has_stop_strings=has_stop_strings,
        forced=expectations.force_include_usage,
    )


def _stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    values = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return [value for value in values if isinstance(value, str) and value]


def _forced_tool_calls(body: dict[str, Any]) -> bool:
    """A named or required `tool_choice`: the text is read as tool-call JSON, and text that does not
    parse (cut by a stop string, say) is dropped, as vLLM drops it."""
    choice = body.get("tool_choice")
    return bool(body.get("tools")) and (choice == "required" or isinstance(choice, dict))


def _check_stop_strings(body: dict[str, Any], choice: Choice, *, parsed: bool = False) -> None:
    """Output ends at the first stop string: cut before it, or right after it with include_stop_str_in_output
    (`parsed`: the text became tool calls, so only the stop reason is checked)."""
    stops = _stop_strings(body)
    if isinstance(choice.stop_reason, str):
        expect(choice.stop_reason in stops, f"stop_reason {choice.stop_reason!r} is not one of {stops!r}")
        expect(choice.finish_reason == "stop", "a stop string must finish with 'stop'", choice)
    if not stops or body.get("echo") or parsed:
        return
    if body.get("include_stop_str_in_output"):
        if isinstance(choice.stop_reason, str):
            expect(choice.text.endswith(choice.stop_reason), "the stop string must end the text", choice)
        return
    for stop in stops:
        expect(stop not in choice.text, f"stop string {stop!r} left in the text", choice)


def _check_prompt_logprobs(body: dict[str, Any], entries: Any, prompt: Sequence[int]) -> None:
    """One entry per prompt token, the first None (nothing precedes it), when prompt_logprobs was asked."""
    wanted = body.get("prompt_logprobs")
    if not isinstance(wanted, int) or isinstance(wanted, bool):
        return
    expect(isinstance(entries, list), "prompt_logprobs requested but missing", entries)
    expect(
        len(entries) == len(prompt), f"{len(entries)} prompt_logprobs entries for {len(prompt)} prompt tokens"
    )
    expect(entries[0] is None, "the first prompt_logprobs entry must be null", entries[:2])
    for entry in entries[1:]:
        expect(isinstance(entry, dict) and entry, "a prompt_logprobs entry must be a non-empty object", entry)


def _plain_text_request(body: dict[str, Any], *, chat: bool) -> bool:
    """True when the choice text must be exactly the detokenized output (nothing cut, added or parsed)."""
    if body.get("stop") or body.get("echo") or body.get("skip_special_tokens") is False:
        return False
    if body.get("bad_words") or body.get("include_stop_str_in_output"):
        return False
    if chat and (body.get("tools") or body.get("tool_choice") not in (None, "none")):
        return False
    return True


def _check_logprob_count(body: dict[str, Any], choice: Choice, tokens: list[int], *, chat: bool) -> None:
    wanted = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
    if isinstance(body.get("logprobs"), bool) and not chat:
        wanted = False  # `logprobs: true` is not a valid completions value; a 200 must not invent any
    if not wanted:
        expect(choice.logprob_tokens is None, "logprobs were not requested but came back", choice)
        return
    expect(choice.logprob_tokens is not None, "logprobs were requested but none came back", choice)
    assert choice.logprob_tokens is not None
    if not body.get("echo"):
        expect(
            len(choice.logprob_tokens) <= len(tokens),
            f"{len(choice.logprob_tokens)} logprob entries for {len(tokens)} generated tokens",
        )


def _check_usage(
    body: dict[str, Any],
    answer: Answer,
    transcript: Transcript,
    *,
    stream: bool,
    has_stop_strings: bool,
    forced: bool,
) -> None:
    usage = answer.usage
    if stream:
        options = body.get("stream_options")
        include = forced or (isinstance(options, dict) and options.get("include_usage", True))
        if not include:
            expect(usage is None, "usage in a stream that did not ask for it", usage)
            return
        expect(usage is not None, "stream_options.include_usage but no usage chunk")
    expect(isinstance(usage, dict), "usage missing", usage)
    assert usage is not None
    prompt, completion, total = (
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
        usage.get("total_tokens"),
    )
    expect(all(isinstance(v, int) and v >= 0 for v in (prompt, total)), "usage counts", usage)
    completion = completion or 0
    expect(prompt + completion == total, "usage: prompt + completion != total", usage)
    if not transcript.generates:
        return
    expect(
        prompt == sum(len(g.prompt_token_ids) for g in transcript.generates),
        "usage.prompt_tokens != tokens in the submitted prompts",
        usage,
        [len(g.prompt_token_ids) for g in transcript.generates],
    )
    fed = sum(len(tokens) for tokens in transcript.tokens.values())
    if has_stop_strings or transcript.aborts:
        expect(completion <= fed, f"usage.completion_tokens {completion} > {fed} tokens generated", usage)
    else:
        expect(completion == fed, f"usage.completion_tokens {completion} != {fed} tokens generated", usage)


def _parse_whole(transcript: Transcript, *, chat: bool) -> Answer:
    try:
        payload = strict_json(transcript.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OracleError(f"200 body is not strict JSON ({exc}): {transcript.body[:300]!r}") from None
    expect(isinstance(payload, dict), "200 body is not an object", payload)
    expect(payload.get("object") == ("chat.completion" if chat else "text_completion"), "object", payload)
    _check_envelope(payload)
    choices: dict[int, Choice] = {}
    expect(isinstance(payload.get("choices"), list), "choices must be a list", payload)
    for raw in payload["choices"]:
        expect(isinstance(raw, dict) and isinstance(raw.get("index"), int), "choice without index", raw)
        expect(raw["index"] not in choices, f"duplicate choice index {raw['index']}")
        choice = Choice(
            index=raw["index"],
            finish_reason=raw.get("finish_reason"),
            stop_reason=raw.get("stop_reason"),
            token_ids=raw.get("token_ids"),
            prompt_logprobs=raw.get("prompt_logprobs"),
        )
        if chat:
            message = raw.get("message")
            expect(
                isinstance(message, dict) and isinstance(message.get("role"), str), "chat choice message", raw
            )
            content = message.get("content")
            expect(content is None or isinstance(content, str), "message.content", raw)
            choice.text = content or ""
            choice.role = message["role"]
            choice.tool_calls = list(message.get("tool_calls") or [])
            choice.reasoning = message.get("reasoning") or ""
            choice.logprob_tokens = _chat_logprob_tokens(raw.get("logprobs"))
        else:
            expect(isinstance(raw.get("text"), str), "completion choice text", raw)
            choice.text = raw["text"]
            choice.logprob_tokens = _completion_logprob_tokens(raw.get("logprobs"))
        choices[choice.index] = choice
    expect(isinstance(payload.get("usage"), dict), "usage must be an object", payload)
    return Answer(
        payload["id"],
        payload["model"],
        choices,
        payload["usage"],
        prompt_logprobs=payload.get("prompt_logprobs"),
    )


def _check_envelope(payload: dict[str, Any]) -> None:
    expect(isinstance(payload.get("id"), str) and payload["id"], "id", payload)
    expect(isinstance(payload.get("created"), int), "created", payload)
    expect(isinstance(payload.get("model"), str), "model", payload)


def _chat_logprob_tokens(logprobs: Any) -> list[str] | None:
    if logprobs is None:
        return None
    expect(isinstance(logprobs, dict), "chat logprobs must be an object", logprobs)
    content = logprobs.get("content") or []
    tokens = []
    for entry in content:
        expect(isinstance(entry.get("token"), str), "logprob entry token", entry)
        expect(
            isinstance(entry.get("logprob"), int | float) and entry["logprob"] >= MIN_LOGPROB,
            "logprob",
            entry,
        )
        for alternative in entry.get("top_logprobs") or []:
            expect(alternative.get("logprob", 0) >= MIN_LOGPROB, "top logprob below the floor", entry)
        tokens.append(entry["token"])
    return tokens


def _completion_logprob_tokens(logprobs: Any) -> list[str] | None:
    if logprobs is None:
        return None
    expect(isinstance(logprobs, dict), "completion logprobs must be an object", logprobs)
    columns = ("text_offset", "token_logprobs", "tokens", "top_logprobs")
    lengths = {name: len(logprobs.get(name) or []) for name in columns}
    expect(len(set(lengths.values())) == 1, "completion logprob columns differ in length", lengths)
    for value in logprobs.get("token_logprobs") or []:
        expect(value is None or value >= MIN_LOGPROB, "token logprob below the floor", value)
    return list(logprobs.get("tokens") or [])


def _sse_payloads(body: bytes) -> list[Any]:
    """The JSON payloads of an SSE body, checking the framing; the [DONE] frame is not included."""
    expect(body.endswith(b"data: [DONE]\n\n"), "an SSE stream must end with `data: [DONE]`", body[-300:])
    frames = body.split(b"\n\n")
    expect(frames[-1] == b"", "trailing bytes after the last frame")
    frames = frames[:-1]
    expect(frames.count(b"data: [DONE]") == 1, "[DONE] must come exactly once")
    payloads = []
    for frame in frames[:-1]:
        expect(frame.startswith(b"data: "), "an SSE frame must start with `data: `", frame[:200])
        try:
            payloads.append(strict_json(frame[len(b"data: ") :]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise OracleError(f"an SSE frame is not strict JSON ({exc}): {frame[:300]!r}") from None
    return payloads


def _parse_stream(transcript: Transcript, *, chat: bool) -> Answer:
    payloads = _sse_payloads(transcript.body)
    expect(payloads, "a stream with no chunk at all")
    kind = "chat.completion.chunk" if chat else "text_completion"
    choices: dict[int, Choice] = {}
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    ident = model = created = None
    for number, payload in enumerate(payloads):
        expect(isinstance(payload, dict), "an SSE chunk must be an object", payload)
        expect(error is None, "chunks after an SSE error frame", payload)
        if "error" in payload:
            error = _check_error_body(payload, payload.get("error", {}).get("code", -1), "SSE error frame")
            continue
        expect(payload.get("object") == kind, f"chunk object must be {kind}", payload)
        _check_envelope(payload)
        if ident is None:
            ident, model, created = payload["id"], payload["model"], payload["created"]
        expect(
            (payload["id"], payload["model"], payload["created"]) == (ident, model, created),
            "chunk envelope changed",
        )
        expect(isinstance(payload.get("choices"), list), "chunk choices must be a list", payload)
        expect(len(payload["choices"]) <= 1, "a chunk must carry one choice at most", payload)
        if payload.get("usage") is not None:
            expect(isinstance(payload["usage"], dict), "chunk usage", payload)
            usage = payload["usage"]
        if not payload["choices"]:
            expect(payload.get("usage") is not None, "a chunk with no choice and no usage", payload)
            expect(number == len(payloads) - 1, "the usage-only chunk must come last", payload)
            continue
        raw = payload["choices"][0]
        expect(isinstance(raw.get("index"), int), "stream choice index", raw)
        choice = choices.setdefault(raw["index"], Choice(index=raw["index"]))
        expect(
            choice.finish_reason is None, f"choice {choice.index}: a chunk after its finish_reason", payload
        )
        if chat:
            delta = raw.get("delta")
            expect(isinstance(delta, dict), "chat chunk delta", raw)
            if delta.get("role") is not None:
                expect(choice.role is None, f"choice {choice.index}: role sent twice", payload)
                choice.role = delta["role"]
            content = delta.get("content")
            expect(content is None or isinstance(content, str), "delta.content", raw)
            choice.text += content or ""
            choice.reasoning += delta.get("reasoning") or ""
            choice.tool_calls.extend(delta.get("tool_calls") or [])
            new_logprobs = _chat_logprob_tokens(raw.get("logprobs"))
        else:
            expect(isinstance(raw.get("text"), str), "completion chunk text", raw)
            choice.text += raw["text"]
            new_logprobs = _completion_logprob_tokens(raw.get("logprobs"))
        if new_logprobs is not None:
            choice.logprob_tokens = (choice.logprob_tokens or []) + new_logprobs
        if raw.get("finish_reason") is not None:
            choice.finish_reason = raw["finish_reason"]
            choice.stop_reason = raw.get("stop_reason")
    expect(ident is not None or error is not None, "a stream without a single chunk")
    if error is None:
        for choice in choices.values():
            expect(choice.finish_reason is not None, f"choice {choice.index} never got a finish_reason")
    return Answer(ident or "", model or "", choices, usage, error)


def _last_header(request: FuzzRequest, name: bytes) -> bytes | None:
    values = [value for key, value in request.headers if key.lower() == name]
    return values[-1] if values else None


# ---------------------------------------------------------------------------------------------
# pooling successes: /v1/embeddings, /pooling, /classify, /score, /rerank

_ID_PREFIXES = {EMBEDDINGS_PATH: "embd-", POOLING_PATH: "pool-", CLASSIFY_PATH: "classify-"}
_SCORE_EPS = 1e-9


def _id_prefix(path: str) -> str:
    return _ID_PREFIXES.get(path) or ("score-" if path in SCORE_PATHS else "rerank-")


def _check_pooling_success(request: FuzzRequest, transcript: Transcript, expectations: Expectations) -> None:
    body = request_json(request)
    expect(body is not None, "a 200 for a body that is not a JSON object", request.body[:300])
    assert body is not None
    encodes = transcript.encodes
    expect(encodes, "a pooling success without any Encode")
    missing = [e.request_id for e in encodes if e.request_id not in transcript.pooled]
    expect(not missing, "a pooling answer before every input was pooled", missing)
    pooled = [transcript.pooled[e.request_id] for e in encodes]
    prompt_tokens = sum(p.num_prompt_tokens for p in pooled)
    path = request.path
    if path in (EMBEDDINGS_PATH, POOLING_PATH) and body.get("encoding_format") == "bytes":
        _check_pooling_bytes(request, transcript, body, pooled, prompt_tokens, expectations)
        return
    expect(
        (transcript.header(b"content-type") or b"").startswith(b"application/json"),
        f"{path}: a JSON answer must be application/json",
        transcript.headers,
    )
    try:
        payload = strict_json(transcript.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OracleError(f"{path}: a 200 whose body is not JSON ({exc})") from None
    expect(isinstance(payload, dict), f"{path}: not an object", payload)
    model = _check_pooling_envelope(request, payload, body, expectations)
    if path in RERANK_PATHS:
        _check_rerank(payload, body, model, pooled, prompt_tokens)
        return
    expect(
        payload.get("object") == "list" and isinstance(payload.get("created"), int),
        f"{path}: envelope",
        payload,
    )
    usage = payload.get("usage")
    expect(
        usage
        == {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
        f"{path}: usage must count the prompt tokens of every input ({prompt_tokens})",
        usage,
    )
    data = payload.get("data")
    expect(isinstance(data, list), f"{path}: `data` must be a list", payload)
    if path in SCORE_PATHS:
        _check_scores(data, body, model, pooled)
        return
    expect(len(data) == len(pooled), f"{path}: {len(data)} items for {len(pooled)} inputs", data)
    for index, (item, result) in enumerate(zip(data, pooled, strict=True)):
        expect(item.get("index") == index, f"{path}: item {index} has index {item.get('index')}", item)
        if path == CLASSIFY_PATH:
            probs = list(result.data)
            top = max(range(len(probs)), key=probs.__getitem__)
            expect(
                item
                == {
                    "index": index,
                    "label": model.pooling.id2label.get(top) if model.pooling else None,
                    "probs": probs,
                    "num_classes": len(probs),
                },
                "/classify: item does not match the engine's output",
                item,
                probs,
            )
            continue
        key, kind = ("embedding", "embedding") if path == EMBEDDINGS_PATH else ("data", "pooling")
        expect(
            item.get("object") == kind and set(item) == {"index", "object", key}, f"{path}: item keys", item
        )
        _check_vector(item[key], result.data, body, path)


def _check_pooling_envelope(
    request: FuzzRequest, payload: dict[str, Any], body: dict[str, Any], expectations: Expectations
) -> ServedModel:
    name = payload.get("model")
    expect(name in expectations.models, f"unknown model {name!r} in the answer", payload)
    model = expectations.models[name]
    if isinstance(body.get("model"), str) and body["model"]:
        expect(name == body["model"], f"asked for {body['model']!r}, answered as {name!r}")
    prefix = _id_prefix(request.path)
    ident = payload.get("id")
    expect(isinstance(ident, str) and ident.startswith(prefix), f"bad id {ident!r}")
    header_id = _last_header(request, b"x-request-id")
    if header_id:
        expect(ident == prefix + header_id.decode("latin-1"), f"id {ident!r} does not follow X-Request-Id")
    elif (
        isinstance(body.get("request_id"), str)
        and body["request_id"]
        and request.path
        not in (
            *SCORE_PATHS,
            *RERANK_PATHS,
        )
    ):
        expect(ident == prefix + body["request_id"], f"id {ident!r} does not follow the body's request_id")
    return model


def _check_vector(value: Any, data: Any, body: dict[str, Any], path: str) -> None:
    rows = [list(row) for row in data] if data and not isinstance(data[0], float) else None
    flat = [x for row in rows for x in row] if rows is not None else list(data)
    if body.get("encoding_format") != "base64":
        expect(
            value == (rows if rows is not None else flat),
            f"{path}: floats differ from the engine's",
            value,
            data,
        )
        return
    expect(isinstance(value, str), f"{path}: base64 output must be a string", value)
    raw = base64.b64decode(value, validate=True)
    expect(
        raw == _packed(flat, body), f"{path}: base64 bytes differ from the engine's vector cast", value, flat
    )


def _packed(values: list[float], body: dict[str, Any]) -> bytes:
    """The reference encoding, independently of the core: struct casts, bfloat16 by rounding float32."""
    dtype = body.get("embed_dtype", "float32")
    endianness = body.get("endianness", "native")
    order = {"little": "<", "big": ">"}[sys.byteorder if endianness == "native" else endianness]
    if dtype == "bfloat16":
        out = b""
        for value in values:
            (bits,) = struct.unpack("<I", struct.pack("<f", value))
            out += struct.pack(order + "H", ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)
        return out
    return struct.pack(f"{order}{len(values)}{'f' if dtype == 'float32' else 'e'}", *values)


def _check_pooling_bytes(
    request: FuzzRequest,
    transcript: Transcript,
    body: dict[str, Any],
    pooled: Sequence[Any],
    prompt_tokens: int,
    expectations: Expectations,
) -> None:
    expect(
        transcript.header(b"content-type") == b"application/octet-stream",
        "bytes: content type",
        transcript.headers,
    )
    header = transcript.header(b"metadata")
    expect(header is not None, "bytes: no metadata header", transcript.headers)
    assert header is not None
    metadata = strict_json(header)
    _check_pooling_envelope(request, metadata, body, expectations)
    expect(
        metadata.get("usage") == {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        "bytes: usage",
    )
    items = metadata.get("data")
    expect(isinstance(items, list) and len(items) == len(pooled), "bytes: one item per input", items)
    offset = 0
    for index, (item, result) in enumerate(zip(items, pooled, strict=True)):
        data = result.data
        rows = data and not isinstance(data[0], float)
        flat = [x for row in data for x in row] if rows else list(data)
        shape = [len(data), len(data[0])] if rows else [len(data)]
        expect(
            item.get("index") == index and item.get("shape") == shape, "bytes: index or shape", item, shape
        )
        expect(item.get("start") == offset, "bytes: items must tile the body", item)
        chunk = transcript.body[item["start"] : item["end"]]
        expect(chunk == _packed(flat, body), "bytes: a slice differs from the engine's vector cast", item)
        offset = item["end"]
    expect(offset == len(transcript.body), "bytes: the body is longer than its items")


def _texts(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _check_scores(data: list[Any], body: dict[str, Any], model: ServedModel, pooled: Sequence[Any]) -> None:
    pairs = [
        (a, b)
        for a, b in (
            ("text_1", "text_2"),
            ("queries", "documents"),
            ("queries", "items"),
            ("data_1", "data_2"),
        )
        if a in body and b in body
    ]
    first, second = (_texts(body[name]) for name in pairs[0])
    expect(len(data) == max(len(first), len(second)), "/score: one score per pair", data)
    for index, item in enumerate(data):
        expect(
            set(item) == {"index", "object", "score"}
            and item["index"] == index
            and item["object"] == "score",
            "/score: item",
            item,
        )
        score = item["score"]
        expect(isinstance(score, float) and math.isfinite(score), "/score: a finite score", item)
        if model.supports("score"):
            expect(score == pooled[index].data[0], "/score: a cross-encoder's score is its output", item)
        else:
            expect(-1 - _SCORE_EPS <= score <= 1 + _SCORE_EPS, "/score: a cosine lies in [-1, 1]", item)
    if not model.supports("score"):
        expect(len(pooled) == len(set(first) | set(second)), "/score: every distinct text embedded once")


def _check_rerank(
    payload: dict[str, Any],
    body: dict[str, Any],
    model: ServedModel,
    pooled: Sequence[Any],
    prompt_tokens: int,
) -> None:
    expect(set(payload) == {"id", "model", "usage", "results", "meta"}, "/rerank: keys", payload)
    expect(
        payload["usage"] == {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}, "/rerank: usage"
    )
    expect(
        payload["meta"] == {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
        "/rerank: meta",
    )
    documents = [doc if isinstance(doc, str) else doc["text"] for doc in body["documents"]]
    top_n = body.get("top_n") or 0
    results = payload["results"]
    expect(
        len(results) == (min(top_n, len(documents)) if top_n else len(documents)), "/rerank: top_n", results
    )
    indices = [result.get("index") for result in results]
    expect(
        len(set(indices)) == len(indices) and all(0 <= i < len(documents) for i in indices),
        "/rerank: indices",
    )
    scores = [result.get("relevance_score") for result in results]
    expect(scores == sorted(scores, reverse=True), "/rerank: not sorted by score", scores)
    with_documents = body.get("return_documents") is not False
    for result in results:
        if with_documents:
            expect(
                result.get("document") == {"text": documents[result["index"]]}, "/rerank: document", result
            )
        else:
            expect("document" not in result, "/rerank: a document without return_documents", result)
        if model.supports("score"):
            expect(
                result["relevance_score"] == pooled[result["index"]].data[0], "/rerank: cross-encoder score"
            )
        else:
            expect(
                -1 - _SCORE_EPS <= result["relevance_score"] <= 1 + _SCORE_EPS, "/rerank: a cosine", result
            )
