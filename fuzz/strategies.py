"""Hypothesis strategies for HTTP requests to the OpenAI-compatible surface.

Three families, from the field set of `reference/openai-server.md` §2:

- `valid_*_bodies`: bodies the server must accept (every sampling parameter, streaming options,
  n, logprobs, echo, stop strings, logit_bias, structured output in all its spellings, tools,
  messages of every content form, several prompts and token-id prompts). A "valid" body may
  still be refused for reasons the generator cannot see (context length after templating), so
  properties accept a clean 4xx for them too; they are here to reach the success paths.
- `almost_valid_bodies`: a valid body with one or two faults (a field of the wrong type or out of
  range, a required field missing, non-finite or huge numbers, lone surrogates, deep nesting,
  the combinations the validators forbid).
- `garbage_requests`: anything else an HTTP peer can send (random bytes, truncated JSON, JSON
  that is not an object, wrong content types, random methods, paths and headers).

Bodies are plain dicts encoded with `fuzz.jsontext.dumps`, so `Raw` values can splice in text no
JSON encoder writes. Everything is parameterised by a `Profile` (the served model's names,
vocabulary size and context length) so token ids can be in or out of range on purpose.

Strategy factories are memoised (`functools.cache`): hypothesis validates every new strategy
object on first draw, and rebuilding them per example tripled the generation time.
"""

from __future__ import annotations

import base64
import functools
import json
import string
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from fuzz import media_samples
from fuzz.jsontext import Raw, dumps

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
KNOWN_PATHS = (
    CHAT_PATH,
    COMPLETIONS_PATH,
    "/v1/models",
    "/v1/embeddings",
    "/health",
    "/ping",
    "/version",
    "/tokenize",
    "/detokenize",
    "/metrics",
    "/load",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/pooling",
    "/classify",
    "/invocations",
    "/v1/responses",
    "/openapi.json",
    "/v1/models/tiny",
    "/v1/models/no/such/model",
)
JSON_CONTENT_TYPES = (b"application/json", b"application/json; charset=utf-8", b"Application/JSON")


@dataclass(frozen=True)
class Profile:
    """What the generators need to know about the served model."""

    model_names: tuple[str, ...] = ("tiny",)
    vocab_size: int = 256
    max_model_len: int = 512
    max_text: int = 24  # characters per generated text field; keeps prompts inside the context
    max_tokens: int = 12  # upper bound for generated max_tokens (the fake engine emits at most this)
    media: bool = False  # valid chat bodies carry image parts (the model takes images)
    media_limit: int | None = None  # the server's --limit-mm-per-prompt for images: valid bodies keep to it
    model_tasks: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, tasks) of each model, for pooling


@dataclass(frozen=True)
class FuzzRequest:
    """One HTTP request as the protocol core sees it (ASGI-style lower-case header names)."""

    method: str
    path: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    family: str  # "valid", "almost", "garbage": which generator made it (for statistics)
    payload: Any = field(default=None, compare=False)  # the dict before encoding, when there was one

    @property
    def json_body(self) -> dict[str, Any] | None:
        """The body as a dict when it was generated from one (Raw values left in place)."""
        return self.payload if isinstance(self.payload, dict) else None


# ---------------------------------------------------------------------------------------------
# building blocks


SAFE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x1FFFF), min_size=0, max_size=24
)
WORDS = st.sampled_from(["Hello", "Paris", "stop", "\n", " ", "END", "é", "日本", "🙂", "</s>", "<|im_end|>"])


@functools.cache
def texts(profile: Profile, min_size: int = 0) -> st.SearchStrategy[str]:
    plain = st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x1FFFF),
        min_size=min_size,
        max_size=profile.max_text,
    )
    words = st.lists(WORDS, min_size=max(min_size, 1), max_size=4).map("".join)
    return st.one_of(plain, words)


@functools.cache
def token_ids(profile: Profile) -> st.SearchStrategy[int]:
    return st.integers(0, profile.vocab_size - 1)


@functools.cache
def finite(lo: float, hi: float, **kwargs: Any) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, **kwargs)


@functools.cache
def identifiers(max_size: int = 12) -> st.SearchStrategy[str]:
    return st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=max_size).filter(
        lambda name: not name[0].isdigit()
    )


@functools.cache
def json_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Arbitrary JSON (finite numbers, any text), as a Python value."""
    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | finite(-1e300, 1e300) | SAFE_TEXT
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SAFE_TEXT, inner, max_size=3),
        max_leaves=max_leaves,
    )


@functools.cache
def json_schemas() -> st.SearchStrategy[dict[str, Any]]:
    prop = st.sampled_from([{"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}])
    objects = st.dictionaries(identifiers(8), prop, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props)[:1]}
    )
    return st.one_of(prop, objects, st.just({"type": "array", "items": {"type": "integer"}, "maxItems": 3}))


# ---------------------------------------------------------------------------------------------
# request fields shared by chat and completions


@functools.cache
def independent_sampling_fields(profile: Profile, *, chat: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Parameters whose valid range does not depend on another field; each one present or not."""
    optional: dict[str, st.SearchStrategy[Any]] = {
        "top_p": st.none() | finite(0.0, 1.0, exclude_min=True),
        "top_k": st.none() | st.integers(-1, 50),
        "min_p": st.none() | finite(0.0, 1.0),
        "repetition_penalty": st.none() | finite(0.05, 2.0),
        "frequency_penalty": st.none() | finite(-2.0, 2.0),
        "presence_penalty": st.none() | finite(-2.0, 2.0),
        "length_penalty": finite(0.0, 2.0),
        "seed": st.none() | st.integers(-(2**63), 2**63 - 1),
        "stop": st.none() | texts(profile, 1) | st.lists(texts(profile, 1), max_size=3),
        "stop_token_ids": st.none() | st.lists(token_ids(profile), max_size=3),
        "include_stop_str_in_output": st.booleans(),
        "ignore_eos": st.booleans(),
        "skip_special_tokens": st.booleans(),
        "spaces_between_special_tokens": st.booleans(),
        "return_token_ids": st.booleans(),
        "return_tokens_as_token_ids": st.booleans(),
        "use_beam_search": st.just(False),
        "logit_bias": st.none()
        | st.dictionaries(token_ids(profile).map(str), finite(-100.0, 100.0), max_size=3),
        "allowed_token_ids": st.none() | st.lists(token_ids(profile), min_size=1, max_size=5),
        "truncate_prompt_tokens": st.none() | st.integers(1, profile.max_model_len),
        "user": st.none() | texts(profile),
        "request_id": identifiers(20),
        "priority": st.just(0),
        "cache_salt": texts(profile, 1),
        "vllm_xargs": st.dictionaries(
            identifiers(8), st.integers(-5, 5) | SAFE_TEXT | finite(-1.0, 1.0), max_size=2
        ),
    }
    if chat:
        optional["bad_words"] = st.lists(texts(profile, 1), max_size=2)
    return st.fixed_dictionaries({}, optional=optional)


GREEDY_TEMPERATURES = st.none() | finite(0.0, 2.0) | st.integers(0, 2)
SAMPLED_TEMPERATURES = st.none() | finite(0.1, 2.0) | st.integers(1, 2)


@functools.cache
@st.composite
def sampling_fields(draw: st.DrawFn, profile: Profile, *, chat: bool) -> dict[str, Any]:
    """The sampling and extra parameters both endpoints take, every one optional and in range."""
    body: dict[str, Any] = draw(independent_sampling_fields(profile, chat=chat))
    n = draw(st.sampled_from([None, 1, 1, 2, 3]))
    if n is not None:
        body["n"] = n
    if draw(st.booleans()):
        # greedy sampling (temperature ~0) requires n == 1
        body["temperature"] = draw(SAMPLED_TEMPERATURES if n is not None and n > 1 else GREEDY_TEMPERATURES)
    max_tokens = draw(st.none() | st.integers(1, profile.max_tokens))
    if max_tokens is not None:
        key = draw(st.sampled_from(["max_tokens", "max_completion_tokens"])) if chat else "max_tokens"
        body[key] = max_tokens
        if draw(st.booleans()):
            body["min_tokens"] = draw(st.integers(0, max_tokens))
    body.update(draw(structured_output_fields(profile)))
    return body


@functools.cache
@st.composite
def structured_output_fields(draw: st.DrawFn, profile: Profile) -> dict[str, Any]:
    """At most one decoding constraint, in one of its accepted spellings."""
    choices = st.lists(texts(profile, 1), min_size=1, max_size=3, unique=True)
    constraint = draw(
        st.sampled_from(
            [
                "none",
                "text",
                "json_object",
                "json_schema",
                "guided_json",
                "guided_json_str",
                "guided_regex",
                "guided_choice",
                "guided_grammar",
                "structured_outputs",
            ]
        )
    )
    if constraint == "none":
        return {}
    if constraint == "text":
        return {"response_format": {"type": "text"}}
    if constraint == "json_object":
        return {"response_format": {"type": "json_object"}}
    if constraint == "json_schema":
        spec: dict[str, Any] = {"name": draw(identifiers()), "schema": draw(json_schemas())}
        if draw(st.booleans()):
            spec["strict"] = draw(st.booleans())
        return {"response_format": {"type": "json_schema", "json_schema": spec}}
    if constraint == "guided_json":
        return {"guided_json": draw(json_schemas())}
    if constraint == "guided_json_str":
        return {"guided_json": json.dumps(draw(json_schemas()))}
    if constraint == "guided_regex":
        return {"guided_regex": draw(st.sampled_from(["[a-z]+", "\\d{1,3}", "(yes|no)", "[A-Z][a-z]*!"]))}
    if constraint == "guided_choice":
        return {"guided_choice": draw(choices)}
    if constraint == "guided_grammar":
        return {"guided_grammar": '?start: "yes" | "no"'}
    inner = draw(
        st.sampled_from(
            [
                {"regex": "[0-9]+"},
                {"choice": ["a", "b"]},
                {"json": {"type": "object"}},
                {"json_object": True},
                {"grammar": '?start: "x"'},
            ]
        )
    )
    return {"structured_outputs": inner}


@functools.cache
@st.composite
def stream_fields(draw: st.DrawFn, *, allow_prompt_logprobs: bool = True) -> dict[str, Any]:
    stream = draw(st.sampled_from([None, False, True]))
    body: dict[str, Any] = {} if stream is None else {"stream": stream}
    if stream and draw(st.booleans()):
        options = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "include_usage": st.booleans() | st.none(),
                    "continuous_usage_stats": st.booleans() | st.none(),
                },
            )
        )
        body["stream_options"] = options
    if not stream and allow_prompt_logprobs and draw(st.booleans()):
        body["prompt_logprobs"] = draw(st.none() | st.integers(0, 5))
    return body


@functools.cache
def extra_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Unknown fields, which the server accepts and ignores (vLLM's extra='allow')."""
    names = identifiers(16).map(lambda name: "x_" + name)
    return st.dictionaries(names, json_values(4), max_size=2)


# ---------------------------------------------------------------------------------------------
# chat


@functools.cache
def tool_definitions() -> st.SearchStrategy[list[dict[str, Any]]]:
    function = st.fixed_dictionaries(
        {"name": identifiers(16)},
        optional={"description": SAFE_TEXT, "parameters": json_schemas()},
    )
    tool = st.fixed_dictionaries({"type": st.just("function"), "function": function})
    return st.lists(tool, min_size=1, max_size=3, unique_by=lambda tool: tool["function"]["name"])


@functools.cache
@st.composite
def content_parts(draw: st.DrawFn, profile: Profile) -> list[dict[str, Any]]:
    """0-3 text parts; for a profile with `media`, 0-3 image parts among them (valid shapes whose
    outcome may still depend on what a fetch returns)."""
    kinds = st.sampled_from(["text", "input_text", "output_text"])
    parts: list[dict[str, Any]] = [
        {"type": draw(kinds), "text": draw(texts(profile))} for _ in range(draw(st.integers(0, 3)))
    ]
    if profile.media:
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
            parts.insert(draw(st.integers(0, len(parts))), draw(image_parts()))
    return parts


def _within_limit(chat: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """`chat` without the image parts past the first `limit` (None: all kept)."""
    if limit is None:
        return chat
    kept = 0
    for message in chat:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type", "image_url") in ("image_url", "input_image"):  # typeless ones are images
                    kept += 1
                    if kept > limit:
                        continue
                parts.append(part)
            message["content"] = parts
    return chat


# ---------------------------------------------------------------------------------------------
# media content parts (issue 12): every shape vLLM reads, valid and not


MEDIA_PART_TYPES = ("image_url", "input_image", "audio_url", "input_audio", "video_url", "image_embeds")
PYTHON_ONLY_PART_TYPES = ("image_pil", "audio_embeds")  # refused over HTTP
# keys that make a part without `type` a media part (vLLM's shortcut forms)
MEDIA_KEYS = (
    "image_url",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "audio_url",
    "input_audio",
    "video_url",
)
FETCHED_URLS = (
    "https://example.com/cat.png",
    "http://example.com/a.jpg?size=small#frag",
    "HTTPS://EXAMPLE.COM/UPPER.PNG",
    "http://127.0.0.1:8000/local.gif",
    "http://[::1]/v6.png",
    "file:///tmp/images/cat.png",
    "FILE:/tmp/x.png",
    "http://",
    "https://example.com/" + "a" * 3000,
)
# Never fetched: not data:, http(s): or file: (the core refuses them before asking the runtime).
UNFETCHABLE_URLS = (
    "ftp://example.com/x.png",
    "gopher://example.com/",
    "javascript:alert(1)",
    "//example.com/x.png",
    "example.com/x.png",
    "/etc/passwd",
    "C:\\images\\x.png",
    "data",
    "httpx://example.com/",
    " http://example.com/x.png",
    "\u0000",
    "x" * 5000,
)


def _spelled(url: str, spelling: str) -> str:
    """`url` (a base64 data: URL) spelled another way that decodes to the same bytes."""
    header, _, payload = url.partition(",")
    mime = header[len("data:") : -len(";base64")]
    if spelling == "upper":
        return f"DATA:{mime.upper()};BASE64,{payload}"
    if spelling == "no_mime":
        return f"data:;base64,{payload}"
    if spelling == "octet":
        return f"data:application/octet-stream;base64,{payload}"
    if spelling == "params":
        return f"data:{mime};name=x.png;charset=binary;base64,{payload}"
    if spelling == "unpadded":
        return f"{header},{payload.rstrip('=')}"
    if spelling == "wrapped":  # line breaks every 16 characters (MIME style)
        return header + "," + "\r\n".join(payload[i : i + 16] for i in range(0, len(payload), 16))
    if spelling == "percent":
        return header + "," + payload.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    return url


@functools.cache
def image_urls() -> st.SearchStrategy[str]:
    """URLs of images a vision model takes: the samples as data: URLs (spelled many ways), or URLs
    the runtime fetches (what it feeds back decides)."""
    names = st.sampled_from(media_samples.IMAGE_NAMES)
    spellings = st.sampled_from(
        ["plain", "upper", "no_mime", "octet", "params", "unpadded", "wrapped", "percent"]
    )
    inline = st.builds(
        lambda name, spelling: _spelled(media_samples.image_data_urls()[name], spelling), names, spellings
    )
    return st.one_of(inline, inline, st.sampled_from(FETCHED_URLS[:7]))


@functools.cache
@st.composite
def image_parts(draw: st.DrawFn, urls: st.SearchStrategy[Any] | None = None) -> dict[str, Any]:
    """An image part in one of its accepted shapes, carrying a URL drawn from `urls`."""
    url = draw(urls if urls is not None else image_urls())
    shape = draw(
        st.sampled_from(
            ["object", "object", "detail", "string", "input_image", "typeless", "typeless_string"]
        )
    )
    if shape == "object":
        return {"type": "image_url", "image_url": {"url": url}}
    if shape == "detail":
        return {
            "type": "image_url",
            "image_url": {"url": url, "detail": draw(st.sampled_from(["auto", "low", "high"]))},
        }
    if shape == "string":
        return {"type": "image_url", "image_url": url}
    if shape == "input_image":
        return {"type": "input_image", "image_url": url}
    if shape == "typeless":
        return {"image_url": {"url": url}}
    return {"image_url": url}


@st.composite
def mutated_image_bytes(draw: st.DrawFn) -> bytes:
    """A sample with one or two mutations: truncated, bytes flipped, junk inserted, or random bytes."""
    data = bytearray(media_samples.images()[draw(st.sampled_from(media_samples.IMAGE_NAMES))])
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "random"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data = bytearray(draw(st.binary(max_size=64)))
    return bytes(data)


BAD_BASE64 = (
    "@@@not base64@@@",
    "iVBORw0KGgo-_",  # URL-safe alphabet
    "iVBORw0KG",  # a length no padding fixes
    "iVBO==Rw0K",  # padding in the middle
    "é" * 8,
    "",
)
WRONG_IMAGE_MIMES = (
    "text/plain",
    "audio/wav",
    "video/mp4",
    "application/json",
    "image",
    "image/png\u0000",
    "*/*",
)


@functools.cache
def broken_image_urls() -> st.SearchStrategy[str]:
    """data: URLs that are not a usable image (mutated bytes, another media type, bad base64, no
    comma) and URLs of schemes the core never fetches."""
    png = media_samples.images()["png"]
    return st.one_of(
        mutated_image_bytes().map(lambda data: media_samples.data_url(data, "image/png")),
        st.sampled_from(WRONG_IMAGE_MIMES).map(lambda mime: media_samples.data_url(png, mime)),
        st.sampled_from(BAD_BASE64).map(lambda payload: "data:image/png;base64," + payload),
        st.just(media_samples.data_url(media_samples.wav(), "audio/wav")),
        st.just(media_samples.data_url(media_samples.wav(), "image/png")),  # audio bytes claiming to be PNG
        st.sampled_from(["data:image/png;base64", "data:", "data:,", "data:image/png,raw%FFbytes", ""]),
        st.sampled_from(UNFETCHABLE_URLS),
    )


@functools.cache
def input_audio_values() -> st.SearchStrategy[Any]:
    """`input_audio` values: a valid WAV, and objects with data or format wrong or missing."""
    wav = base64.b64encode(media_samples.wav()).decode("ascii")
    return st.sampled_from(
        [
            {"data": wav, "format": "wav"},
            {"data": wav},
            {"data": wav, "format": "WAV"},
            {"data": wav, "format": "exe"},
            {"data": wav, "format": 7},
            {"data": "@@@", "format": "wav"},
            {"data": "", "format": "wav"},
            {"data": 5, "format": "wav"},
            {"data": {"nested": wav}, "format": "wav"},
            {"format": "wav"},
            {},
            "just a string",
            [wav],
            None,
        ]
    )


@functools.cache
def bad_media_parts() -> st.SearchStrategy[Any]:
    """Media parts a vision model taking only images must refuse (some only because of that)."""
    any_url = image_urls() | broken_image_urls()
    junk_urls = st.sampled_from(
        [5, 1.5, True, None, {}, {"x": 1}, ["http://example.com/x.png"], {"url": {"url": "x"}}]
    )
    return st.one_of(
        image_parts(broken_image_urls()),
        st.builds(lambda url: {"type": "image_url", "image_url": {"url": url}}, junk_urls),
        st.builds(lambda url: {"type": "image_url", "image_url": url}, junk_urls),
        st.builds(lambda url: {"type": "input_image", "image_url": url}, junk_urls),
        st.sampled_from(
            [
                {"type": "image_url"},
                {"type": "image_url", "url": "http://example.com/x.png"},  # url at the wrong level
                {"type": None, "image_url": {"url": "http://example.com/x.png"}},
                {"type": "IMAGE_URL", "image_url": {"url": "http://example.com/x.png"}},
                {"type": "image", "image": "http://example.com/x.png"},
                {"type": "input_audio", "input_audio": None},
                {"input_audio": None},  # a null input_audio key does not make a part typed
            ]
        ),
        st.builds(lambda value: {"type": "input_audio", "input_audio": value}, input_audio_values()),
        st.builds(lambda value: {"input_audio": value}, input_audio_values()),
        st.builds(
            lambda kind, url, typed: ({"type": kind} if typed else {}) | {kind: {"url": url}},
            st.sampled_from(["audio_url", "video_url"]),
            st.sampled_from(
                [
                    media_samples.data_url(media_samples.wav(), "audio/wav"),
                    "https://example.com/clip.mp4",
                    "file:///tmp/a.wav",
                ]
            )
            | any_url,
            st.booleans(),
        ),
        st.builds(
            lambda kind, value, typed: ({"type": kind} if typed else {}) | {kind: value},
            st.sampled_from([*PYTHON_ONLY_PART_TYPES, "image_embeds"]),
            st.sampled_from(["AAAA", "@@", {"data": "AAAA"}, None, [0.1, 0.2]]),
            st.booleans(),
        ),
        # embeddings (--enable-mm-embeds): well-formed ones, and NaN, wrong width, no rows
        st.builds(
            lambda name, typed: (
                ({"type": "image_embeds"} if typed else {}) | {"image_embeds": media_samples.embeds()[name]}
            ),
            st.sampled_from(media_samples.EMBEDS_NAMES[:2] + media_samples.EMBEDS_NAMES),
            st.booleans(),
        ),
        st.sampled_from(["<image>", "look: <image>", "<image><image>", "<imag", "<image"]).map(
            lambda text: {"type": "text", "text": text}
        ),
    )


@st.composite
def media_fault(draw: st.DrawFn, profile: Profile, current: list[Any]) -> list[Any]:
    """Messages with a media fault: a bad media part among valid ones, too many images, or a
    placeholder typed in the text. For a text-only model any media part is one."""
    kind = draw(st.sampled_from(["bad_part"] * 3 + ["valid_parts"] * 3 + ["many", "typed", "typed_string"]))
    if kind == "many":  # beyond a --limit-mm-per-prompt, the default 999, or the context
        count = draw(st.sampled_from([3, 5, 40, 1000]))
        part = draw(
            image_parts(st.sampled_from([*media_samples.image_data_urls().values(), FETCHED_URLS[0]]))
        )
        bad = {"role": "user", "content": [{"type": "text", "text": "count them"}, *([part] * count)]}
    elif kind == "typed_string":
        bad = {
            "role": "user",
            "content": draw(st.sampled_from(["<image>", "what is <image>?", "<image>\n<image>"])),
        }
    else:
        parts: list[Any] = [draw(image_parts()) for _ in range(draw(st.integers(0, 2)))]
        if kind == "bad_part":
            new = draw(bad_media_parts())
        elif kind == "typed":
            new = {"type": "text", "text": draw(st.sampled_from(["<image>", "see <image> here"]))}
        else:
            new = draw(image_parts())
        parts.insert(draw(st.integers(0, len(parts))), new)
        bad = {"role": draw(st.sampled_from(["user", "user", "assistant", "system"])), "content": parts}
    position = draw(st.integers(0, len(current)))
    return [*current[:position], bad, *current[position:]]


@st.composite
def messages(draw: st.DrawFn, profile: Profile, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """1-4 messages: any role (custom roles too), string / list / None content, tool traffic."""
    roles = st.sampled_from(["system", "developer", "user", "user", "assistant", "tool"]) | identifiers(10)
    result: list[dict[str, Any]] = []
    for position in range(draw(st.integers(1, 4))):
        role = "user" if position == 0 and draw(st.booleans()) else draw(roles)
        # a model that takes images gets content parts more often, so most chats carry some
        content_kind = draw(
            st.sampled_from(
                ["str", "parts", "parts", "none"] if profile.media else ["str", "str", "parts", "none"]
            )
        )
        content: Any
        if content_kind == "str":
            content = draw(texts(profile))
        elif content_kind == "parts":
            content = draw(content_parts(profile))
        else:
            content = None
        message: dict[str, Any] = {"role": role, "content": content}
        if draw(st.integers(0, 5)) == 0:
            del message["content"]
        if role == "assistant" and tools and draw(st.booleans()):
            function = draw(st.sampled_from(tools))["function"]
            message["tool_calls"] = [
                {
                    "id": "call_" + draw(identifiers(8)),
                    "type": "function",
                    "function": {
                        "name": function["name"],
                        "arguments": draw(st.sampled_from(["{}", "", '{"a": 1}'])),
                    },
                }
            ]
        if role == "tool":
            message["tool_call_id"] = "call_" + draw(identifiers(8))
        if draw(st.integers(0, 4)) == 0:
            message["name"] = draw(identifiers(10))
        if draw(st.integers(0, 9)) == 0:
            message["x_extra"] = draw(json_values(2))  # extra keys inside messages are accepted too
        result.append(message)
    return result


@functools.cache
@st.composite
def valid_chat_bodies(draw: st.DrawFn, profile: Profile = Profile()) -> dict[str, Any]:
    body: dict[str, Any] = {}
    model = draw(st.sampled_from([*profile.model_names, None, "", "<omit>"]))
    if model != "<omit>":
        body["model"] = model
    tools = draw(st.none() | tool_definitions())
    body["messages"] = _within_limit(draw(messages(profile, tools)), profile.media_limit)
    if tools is not None:
        body["tools"] = tools
        choice = draw(st.sampled_from(["<omit>", "none", "auto", "required", "named"]))
        if choice == "named":
            body["tool_choice"] = {
                "type": "function",
                "function": {"name": draw(st.sampled_from(tools))["function"]["name"]},
            }
        elif choice != "<omit>":
            body["tool_choice"] = choice
        if draw(st.booleans()):
            body["parallel_tool_calls"] = draw(st.booleans())
    elif draw(st.integers(0, 5)) == 0:
        body["tool_choice"] = "none"
    body.update(draw(sampling_fields(profile, chat=True)))
    body.update(draw(stream_fields()))
    logprobs = draw(st.sampled_from([None, False, True]))
    if logprobs is not None:
        body["logprobs"] = logprobs
    if logprobs and draw(st.booleans()):
        body["top_logprobs"] = draw(st.integers(0, 5))
    elif not logprobs and draw(st.integers(0, 5)) == 0:
        body["top_logprobs"] = 0
    if draw(st.booleans()):
        body["echo"] = draw(st.booleans())
    prompt_mode = draw(st.sampled_from(["default", "generation", "continue"]))
    if prompt_mode == "generation":
        body["add_generation_prompt"] = True
    elif prompt_mode == "continue":
        body["add_generation_prompt"] = False
        body["continue_final_message"] = True
    if draw(st.booleans()):
        body["add_special_tokens"] = draw(st.booleans())
    if draw(st.integers(0, 4)) == 0:
        body["chat_template_kwargs"] = draw(
            st.dictionaries(identifiers(10), st.booleans() | SAFE_TEXT, max_size=2)
        )
    if draw(st.integers(0, 6)) == 0:
        body["documents"] = draw(st.lists(st.dictionaries(identifiers(8), SAFE_TEXT, max_size=2), max_size=2))
    if draw(st.integers(0, 4)) == 0:
        body["reasoning_effort"] = draw(st.sampled_from(["low", "medium", "high"]))
    if draw(st.integers(0, 4)) == 0:
        body["include_reasoning"] = draw(st.booleans())
    body.update(draw(extra_fields()))
    return body


# ---------------------------------------------------------------------------------------------
# completions


@functools.cache
def prompts(profile: Profile) -> st.SearchStrategy[Any]:
    ids = st.lists(token_ids(profile), min_size=1, max_size=16)
    return st.one_of(
        texts(profile, 1),
        st.lists(texts(profile, 1), min_size=1, max_size=3),
        ids,
        st.lists(ids, min_size=1, max_size=3),
    )


@functools.cache
@st.composite
def valid_completion_bodies(draw: st.DrawFn, profile: Profile = Profile()) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": draw(prompts(profile))}
    model = draw(st.sampled_from([*profile.model_names, None, "", "<omit>"]))
    if model != "<omit>":
        body["model"] = model
    body.update(draw(sampling_fields(profile, chat=False)))
    body.update(draw(stream_fields()))
    if draw(st.booleans()):
        body["logprobs"] = draw(st.none() | st.integers(0, 5))
    if draw(st.booleans()):
        body["echo"] = echo = draw(st.booleans())
        if echo and draw(st.integers(0, 3)) == 0:
            body["max_tokens"] = 0  # echo with max_tokens=0 returns just the prompt
            body.pop("min_tokens", None)
    if draw(st.booleans()):
        body["add_special_tokens"] = draw(st.booleans())
    body.update(draw(extra_fields()))
    return body


# ---------------------------------------------------------------------------------------------
# almost valid: one or two faults in an otherwise valid body


NUMERIC_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "length_penalty",
    "seed",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "top_logprobs",
    "logprobs",
    "prompt_logprobs",
    "truncate_prompt_tokens",
    "priority",
)
OTHER_FIELDS = (
    "model",
    "messages",
    "prompt",
    "stream",
    "stream_options",
    "stop",
    "stop_token_ids",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "tools",
    "tool_choice",
    "echo",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "documents",
    "request_id",
    "cache_salt",
    "suffix",
    "user",
    "vllm_xargs",
    "ignore_eos",
    "skip_special_tokens",
    "use_beam_search",
    "best_of",
    "parallel_tool_calls",
    "reasoning_effort",
    "logits_processors",
)
EXTREME_NUMBERS: tuple[Any, ...] = (
    -1,
    0,
    128,
    129,
    -(2**63) - 1,
    2**63,
    2**64,
    10**30,
    -(10**30),
    10**400,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    0.5,
    1.5,
    True,
    False,
    Raw("1e400"),
    Raw("-1e400"),
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1E+2"),
    Raw("01"),
    Raw("-"),
    Raw(".5"),
    Raw("1.0e-400"),
    "NaN",
    "nan",
    "inf",
    "-inf",
    "Infinity",
    "1",
    "",
    float("nan"),
    float("inf"),
    float("-inf"),
)


def _nested(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


@functools.cache
def deep_nesting() -> st.SearchStrategy[Raw]:
    """Arrays or objects nested up to 20,000 deep (parsers with recursion limits must refuse, not crash)."""
    return st.builds(
        _nested, st.sampled_from([10, 64, 200, 1000, 5000, 20000]), st.sampled_from(["list", "dict"])
    )


@functools.cache
def lone_surrogate_strings() -> st.SearchStrategy[Raw]:
    return st.sampled_from(
        [
            Raw('"\\ud800"'),
            Raw('"abc\\udfff"'),
            Raw('"\\udc00\\ud800"'),
            Raw('"ok\\ud83d"'),
            Raw('"\\u0000"'),
            Raw('"\\x41"'),  # invalid escape
            Raw('"\\u12"'),  # truncated escape
            Raw('"\x01raw control"'),
        ]
    )


@functools.cache
def junk_values() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(EXTREME_NUMBERS),
        json_values(6),
        deep_nesting(),
        lone_surrogate_strings(),
        st.sampled_from([[], {}, [None], {"": None}, "x" * 70000, [1] * 5000]),
    )


def _drop(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != name}


@st.composite
def mutate(draw: st.DrawFn, body: dict[str, Any], profile: Profile, *, chat: bool) -> dict[str, Any]:
    """One fault applied to a copy of `body`."""
    body = dict(body)
    fault = draw(
        st.sampled_from(
            [
                "wrong_type",
                "extreme_number",
                "extreme_number",
                "drop_required",
                "empty_required",
                "bad_message",
                "bad_prompt",
                "unicode",
                "deep_extra",
                "bad_combination",
                "bad_combination",
                "bad_combination",
                "unknown_model",
                *(["bad_media"] if chat else []),
            ]
        )
    )
    required = "messages" if chat else "prompt"
    if fault == "wrong_type":
        body[draw(st.sampled_from(NUMERIC_FIELDS + OTHER_FIELDS))] = draw(junk_values())
    elif fault == "extreme_number":
        body[draw(st.sampled_from(NUMERIC_FIELDS))] = draw(st.sampled_from(EXTREME_NUMBERS))
    elif fault == "drop_required":
        body = _drop(body, required)
    elif fault == "empty_required":
        body[required] = draw(st.sampled_from([[], "", [[]], [""], None, {}]))
    elif fault == "bad_message" and chat:
        body["messages"] = draw(bad_messages(profile, body.get("messages") or []))
    elif fault in ("bad_prompt", "bad_message"):
        body["prompt"] = draw(bad_prompts(profile))
    elif fault == "unicode":
        target = draw(st.sampled_from(["model", "user", "stop", "request_id", "text"]))
        if target == "text":
            text = draw(lone_surrogate_strings())
            if chat:
                body["messages"] = [{"role": "user", "content": text}]
            else:
                body["prompt"] = text
        else:
            body[target] = draw(lone_surrogate_strings())
    elif fault == "bad_media":
        body["messages"] = draw(media_fault(profile, body.get("messages") or []))
    elif fault == "deep_extra":
        body["x_" + draw(identifiers(8))] = draw(deep_nesting() | junk_values())
    elif fault == "unknown_model":
        body["model"] = draw(st.sampled_from(["no-such-model", " ", "TINY", "tiny\u0000", "x" * 5000]))
    else:
        body.update(draw(bad_combinations(profile, chat=chat)))
    return body


@st.composite
def bad_messages(draw: st.DrawFn, profile: Profile, current: list[Any]) -> list[Any]:
    bad = draw(
        st.sampled_from(
            [
                {"content": "no role"},
                {"role": None, "content": "x"},
                {"role": 5, "content": "x"},
                {"role": "user", "content": 5},
                {"role": "user", "content": {"text": "x"}},
                {"role": "user", "content": [{"text": "missing type"}]},
                {"role": "user", "content": [{"type": "mystery", "data": 1}]},
                {"role": "user", "content": [{"type": "text"}]},
                {"role": "user", "content": [{"type": "text", "text": None}]},
                {"role": "user", "content": [{"type": "text", "text": 5}]},
                {"role": "user", "content": ["bare string part"]},
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
                },
                {"role": "user", "content": [{"image_url": "http://example.invalid/x.png"}]},
                {"role": "assistant", "content": None, "tool_calls": "not a list"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                },
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "tool", "content": "x", "tool_call_id": 7},
                {"role": "", "content": ""},
                "a string, not a message",
                None,
                [],
                {},
            ]
        )
    )
    position = draw(st.integers(0, len(current)))
    return [*current[:position], bad, *current[position:]]


@functools.cache
def bad_prompts(profile: Profile) -> st.SearchStrategy[Any]:
    vocab = profile.vocab_size
    return st.sampled_from(
        [
            [vocab],
            [vocab + 1000, 1],
            [-1],
            [2**63],
            [[1, 2], "mixed"],
            [1, "2"],
            [[1, -5]],
            [[]],
            [1.5],
            [True],
            [None],
            {"text": "x"},
            5,
            True,
            [[[1]]],
            [0] * (profile.max_model_len + 10),
            "y" * (profile.max_model_len * 4),
        ]
    )


def rejected_combinations(profile: Profile, *, chat: bool) -> list[dict[str, Any]]:
    """Fields the reference says are a 400 on their own (added to a minimal valid body)."""
    vocab = profile.vocab_size
    options: list[dict[str, Any]] = [
        {"stream": False, "stream_options": {"include_usage": True}},
        {"stream_options": {"include_usage": None}},
        {"stream": True, "prompt_logprobs": 2},
        {"prompt_logprobs": -2},
        {"n": 2, "temperature": 0},
        {"n": 0},
        {"n": -3},
        {"max_tokens": 3, "min_tokens": 5},
        {"stop": [""]},
        {"stop": ""},
        {"stop": [1, 2]},
        {"logit_bias": {str(vocab): 1.0}},
        {"logit_bias": {"abc": 1.0}},
        {"logit_bias": {"1": "high"}},
        {"logit_bias": {"-1": 1.0}},
        {"allowed_token_ids": []},
        {"allowed_token_ids": [vocab]},
        {"guided_json": {"type": "object"}, "guided_regex": "a+"},
        {"response_format": {"type": "yaml"}},
        {"response_format": "json"},
        {"structured_outputs": {"json": {}, "regex": "a"}},
        {"priority": 5},
        {"cache_salt": ""},
        {"truncate_prompt_tokens": profile.max_model_len + 1},
        {"truncate_prompt_tokens": -2},
        {"max_tokens": profile.max_model_len * 100},
        {"max_tokens": 2**31},
        {"max_tokens": -1},
        {"seed": 2**63},
        {"seed": -(2**63) - 1},
        {"temperature": -0.5},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"min_p": 1.5},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.5},
        {"repetition_penalty": 0},
        {"min_tokens": -1},
        {"model": "no-such-model"},
    ]
    if chat:
        return options + [
            {"chat_template": "{{ messages }}"},  # needs --trust-request-chat-template
            {"logprobs": False, "top_logprobs": 3},
            {"logprobs": True, "top_logprobs": 21},
            {"logprobs": True, "top_logprobs": -2},
            {"tool_choice": "auto"},
            {"tool_choice": {"type": "function", "function": {"name": "missing"}}},
            {"tool_choice": {}},
            {"tool_choice": "sometimes"},
            {"tools": [{"type": "function"}]},
            {"tools": "all of them"},
            {"add_generation_prompt": True, "continue_final_message": True},
            {"max_completion_tokens": -1},
            {"reasoning_effort": "extreme"},
            {"messages": [{"role": "user", "content": [{"text": "part without a type"}]}]},
            {"messages": [{"content": "no role"}]},
            {"messages": "hello"},
        ]
    return options + [
        {"suffix": "tail"},
        {"logprobs": 21},
        {"logprobs": -1},
        {"prompt": ""},
        {"prompt": []},
        {"prompt": [profile.vocab_size]},
        {"prompt": [-1]},
        {"prompt": [[]]},
        {"prompt": [0] * (profile.max_model_len + 1)},
        {"prompt": [], "prompt_embeds": "AAAA"},
    ]


def survivable_combinations(profile: Profile, *, chat: bool) -> list[dict[str, Any]]:
    """Odd but possibly acceptable fields: any well-formed answer will do."""
    options: list[dict[str, Any]] = [
        {"max_tokens": 0},
        {"stop": ["a"] * 1000},
        {"stop_token_ids": [-1]},
        {"stop_token_ids": [profile.vocab_size + 5]},
        {"guided_choice": []},
        {"guided_regex": "("},
        {"guided_json": "{not json"},
        {"response_format": {"type": "json_schema"}},
        {"use_beam_search": True},
        {"logits_processors": ["builtins.print"]},
        {"n": 3, "best_of": 2},
        {"echo": True, "max_tokens": 0, "logprobs": 2},
    ]
    if chat:
        return options + [
            {"tool_choice": "required"},
            {"tools": [], "tool_choice": "required"},
            {"messages": []},
            {
                "messages": [{"role": "assistant", "content": "x"}],
                "continue_final_message": True,
                "add_generation_prompt": False,
                "echo": True,
            },
        ]
    return options + [{"logprobs": True}, {"prompt_embeds": ["%%%"]}, {"chat_template": "{{ x }}"}]


@functools.cache
@st.composite
def bad_combinations(draw: st.DrawFn, profile: Profile, *, chat: bool) -> dict[str, Any]:
    """Field combinations the validators reject (or must survive)."""
    rejected = rejected_combinations(profile, chat=chat)
    return draw(st.sampled_from(rejected + survivable_combinations(profile, chat=chat)))


@functools.cache
@st.composite
def almost_valid_bodies(draw: st.DrawFn, profile: Profile = Profile()) -> tuple[str, dict[str, Any]]:
    """(path, body) where the body has one or two faults."""
    chat = draw(st.sampled_from([True, True, True, False]) if profile.media else st.booleans())
    body = draw(valid_chat_bodies(profile) if chat else valid_completion_bodies(profile))
    for _ in range(draw(st.integers(1, 2))):
        body = draw(mutate(body, profile, chat=chat))
    return (CHAT_PATH if chat else COMPLETIONS_PATH), body


# ---------------------------------------------------------------------------------------------
# headers and whole requests


@functools.cache
def request_ids() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=40).map(str.encode),
        st.binary(max_size=40),
        st.sampled_from([b"", b" ", b"\xff\xfe", b"a" * 5000, b"\xc3\xa9t\xc3\xa9", b"id\r\nx"]),
    )


@functools.cache
def authorization_values() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(
            [b"Bearer sk-test", b"bearer sk-test", b"Bearer ", b"Bearer", b"Basic dXNlcjpwYXNz", b""]
        ),
        st.binary(max_size=60).map(lambda raw: b"Bearer " + raw),
        st.binary(max_size=60),
    )


@functools.cache
@st.composite
def polite_headers(draw: st.DrawFn) -> tuple[tuple[bytes, bytes], ...]:
    """Headers a normal client sends with a JSON body, sometimes with a request id or a key."""
    headers = [(b"content-type", draw(st.sampled_from(JSON_CONTENT_TYPES)))]
    if draw(st.booleans()):
        headers.append(
            (
                b"x-request-id",
                draw(
                    st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=32).map(
                        str.encode
                    )
                ),
            )
        )
    if draw(st.integers(0, 3)) == 0:
        headers.append((b"authorization", b"Bearer sk-test"))
    if draw(st.booleans()):
        headers.append(
            (b"accept", draw(st.sampled_from([b"application/json", b"text/event-stream", b"*/*"])))
        )
    draw(st.randoms(use_true_random=False)).shuffle(headers)
    return tuple(headers)


@functools.cache
@st.composite
def garbage_headers(draw: st.DrawFn) -> tuple[tuple[bytes, bytes], ...]:
    header_names = st.sampled_from(
        [b"content-type", b"authorization", b"x-request-id", b"content-length", b"accept", b"user-agent"]
    ) | st.binary(min_size=1, max_size=20).map(bytes.lower)
    content_types = st.sampled_from(
        [
            b"text/plain",
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=x",
            b"application/jsonx",
            b"application/json-patch+json",
            b"json",
            b"",
            b";",
            b"application/json; charset=latin-1",
            b"\xff\xfe",
            *JSON_CONTENT_TYPES,
        ]
    )
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(header_names)
        if name == b"content-type":
            value = draw(content_types)
        elif name == b"authorization":
            value = draw(authorization_values())
        elif name == b"x-request-id":
            value = draw(request_ids())
        else:
            value = draw(st.binary(max_size=30))
        headers.append((name, value))
    return tuple(headers)


@functools.cache
def methods() -> st.SearchStrategy[str]:
    return st.sampled_from(
        ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT"]
    ) | st.text(string.ascii_uppercase, min_size=1, max_size=8)


@functools.cache
def paths() -> st.SearchStrategy[str]:
    variants = st.sampled_from(KNOWN_PATHS).flatmap(
        lambda path: st.sampled_from(
            [
                path,
                path + "/",
                path.upper(),
                "/" + path,
                path + "?x=1",
                path + "/extra",
                path.replace("/", "//"),
            ]
        )
    )
    random_paths = st.text(min_size=0, max_size=30).map(lambda text: "/" + text)
    return st.one_of(
        variants, random_paths, st.sampled_from(["", "*", "/", "/v1", "/v1/", "/%2e%2e/", "/v1/models/tiny"])
    )


@functools.cache
@st.composite
def garbage_bodies(draw: st.DrawFn, profile: Profile) -> bytes:
    kind = draw(
        st.sampled_from(["bytes", "truncated", "non_object", "empty", "deep", "almost_json", "huge", "cesu8"])
    )
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "truncated":
        body = draw(valid_chat_bodies(profile) | valid_completion_bodies(profile))
        encoded = dumps(body)
        return encoded[: draw(st.integers(0, max(len(encoded) - 1, 0)))]
    if kind == "non_object":
        return dumps(
            draw(st.sampled_from([[], [{}], 1, -1.5, "text", None, True, False, [[{"messages": []}]]]))
        )
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n", b"\x00", b"{}", b"{ }", b"\xef\xbb\xbf{}"]))
    if kind == "deep":
        return dumps(draw(deep_nesting()))
    if kind == "almost_json":
        return draw(
            st.sampled_from(
                [
                    b"{'messages': []}",
                    b'{"messages": [],}',
                    b'{"prompt": "x" "y"}',
                    b'{"prompt": "x", "prompt": "y"}',
                    b'{"prompt": "a\\qb"}',
                    b'{"prompt": NaN}',
                    b'{"max_tokens": 1e999, "prompt": "x"}',
                    b'{"prompt": "x"} trailing',
                    b'{"prompt": "x"}{"prompt": "y"}',
                    b'\xef\xbb\xbf{"prompt": "bom"}',
                    b'{"prompt": "\xff\xfe"}',
                    b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
                    b"\x00" * 64,
                ]
            )
        )
    if kind == "cesu8":
        body = draw(valid_chat_bodies(profile) | valid_completion_bodies(profile))
        body["x_surrogate"] = "\ud800"
        return dumps(body, ascii_only=False)
    return b'{"prompt": "' + b"A" * draw(st.sampled_from([70_000, 1_000_000])) + b'"}'


@functools.cache
@st.composite
def valid_requests(draw: st.DrawFn, profile: Profile = Profile()) -> FuzzRequest:
    chat = draw(st.sampled_from([True, True, True, False]) if profile.media else st.booleans())
    body = draw(valid_chat_bodies(profile) if chat else valid_completion_bodies(profile))
    return FuzzRequest(
        "POST",
        CHAT_PATH if chat else COMPLETIONS_PATH,
        draw(polite_headers()),
        dumps(body, ascii_only=draw(st.booleans())),
        "valid",
        body,
    )


@functools.cache
@st.composite
def almost_valid_requests(draw: st.DrawFn, profile: Profile = Profile()) -> FuzzRequest:
    path, body = draw(almost_valid_bodies(profile))
    return FuzzRequest(
        "POST", path, draw(polite_headers()), dumps(body, ascii_only=draw(st.booleans())), "almost", body
    )


@functools.cache
@st.composite
def garbage_requests(draw: st.DrawFn, profile: Profile = Profile()) -> FuzzRequest:
    """Random method, path, headers and body; sometimes only one of them is broken."""
    broken = draw(st.sampled_from(["body", "headers", "method", "path", "all"]))
    method = draw(methods()) if broken in ("method", "all") else "POST"
    path = (
        draw(paths()) if broken in ("path", "all") else draw(st.sampled_from([CHAT_PATH, COMPLETIONS_PATH]))
    )
    headers = draw(garbage_headers()) if broken in ("headers", "all") else draw(polite_headers())
    payload: Any = None
    if broken in ("body", "all"):
        body = draw(garbage_bodies(profile))
    else:
        payload = draw(valid_chat_bodies(profile) if path == CHAT_PATH else valid_completion_bodies(profile))
        body = dumps(payload)
    return FuzzRequest(method, path, headers, body, "garbage", payload)


@functools.cache
@st.composite
def media_requests(draw: st.DrawFn, profile: Profile = Profile()) -> FuzzRequest:
    """Chats that surely carry media (family "media"): a valid body plus one message of image
    parts, a broken or refused media part, too many images, or a typed placeholder."""
    body = draw(valid_chat_bodies(profile))
    body["messages"] = draw(media_fault(profile, body["messages"]))
    return FuzzRequest("POST", CHAT_PATH, draw(polite_headers()), dumps(body), "media", body)


@functools.cache
@st.composite
def tokenizer_requests(draw: st.DrawFn, profile: Profile = Profile()) -> FuzzRequest:
    """/tokenize (completion- or chat-style) and /detokenize bodies, in and out of range."""
    path = draw(st.sampled_from(["/tokenize", "/detokenize"]))
    body: dict[str, Any]
    if path == "/tokenize":
        if draw(st.booleans()):
            body = {"prompt": draw(texts(profile) | lone_surrogate_strings())}
        else:
            body = {"messages": draw(messages(profile, None))}
            if draw(st.booleans()):
                body["add_generation_prompt"] = draw(st.booleans())
        for flag in ("add_special_tokens", "return_token_strs"):
            if draw(st.booleans()):
                body[flag] = draw(st.booleans())
    else:
        wild = st.integers(-5, profile.vocab_size + 5) | st.sampled_from([2**63, -(2**63), 1.5, "1", None])
        body = {"tokens": draw(st.lists(token_ids(profile), max_size=12) | st.lists(wild, max_size=4))}
    if draw(st.booleans()):
        body["model"] = draw(st.sampled_from([*profile.model_names, "", "other"]))
    return FuzzRequest("POST", path, draw(polite_headers()), dumps(body), "tokenizer", body)


@functools.cache
def any_requests(profile: Profile = Profile()) -> st.SearchStrategy[FuzzRequest]:
    """The mix the main property runs: mostly valid and almost-valid bodies, some garbage."""
    return st.one_of(
        valid_requests(profile),
        valid_requests(profile),
        almost_valid_requests(profile),
        almost_valid_requests(profile),
        garbage_requests(profile),
        tokenizer_requests(profile),
    )


# ---------------------------------------------------------------------------------------------
# the pooling endpoints: /v1/embeddings, /pooling, /classify, /score, /rerank


EMBEDDINGS_PATH = "/v1/embeddings"
POOLING_PATH = "/pooling"
CLASSIFY_PATH = "/classify"
SCORE_PATHS = ("/score", "/v1/score")
RERANK_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank")
POOLING_PATHS = (EMBEDDINGS_PATH, POOLING_PATH, CLASSIFY_PATH, *SCORE_PATHS, *RERANK_PATHS)
_ANY_POOLING = {"embed", "classify", "score", "token_embed", "token_classify"}
_PATH_TASKS = {
    EMBEDDINGS_PATH: {"embed"},
    POOLING_PATH: _ANY_POOLING,
    CLASSIFY_PATH: {"classify"},
    **{path: {"embed", "score"} for path in (*SCORE_PATHS, *RERANK_PATHS)},
}


@functools.cache
def pooling_inputs(profile: Profile) -> st.SearchStrategy[Any]:
    """`input`: mostly well-formed (a string, strings, ids, id lists), sometimes empty or out of range."""
    ids = st.lists(token_ids(profile), min_size=1, max_size=8)
    wild_ids = st.lists(st.integers(-2, profile.vocab_size + 2), max_size=4)
    return st.one_of(
        texts(profile, 1),
        st.lists(texts(profile, 1), min_size=1, max_size=3),
        ids,
        st.lists(ids, min_size=1, max_size=3),
        st.sampled_from(["", [], [""], [[]], ["a", 1], "z" * (profile.max_model_len + 1)]),
        wild_ids,
        st.lists(wild_ids, max_size=2),
    )


def _chance(one_in: int) -> st.SearchStrategy[bool]:
    """True about once in `one_in` draws (False is the simple value hypothesis shrinks towards)."""
    return st.sampled_from([False] * (one_in - 1) + [True])


@functools.cache
@st.composite
def pooling_bodies(draw: st.DrawFn, profile: Profile, path: str) -> dict[str, Any]:
    """A body for one of the pooling endpoints, valid more often than not."""
    body: dict[str, Any] = {}
    fitting = [name for name, tasks in profile.model_tasks if set(tasks) & _PATH_TASKS[path]]
    if fitting and not draw(_chance(4)):  # mostly a model that serves the API, or none named
        model = draw(st.sampled_from([*fitting, *fitting, None, "", "<omit>", "<omit>"]))
    else:
        model = draw(st.sampled_from([*profile.model_names, "<omit>", "other"]))
    if model != "<omit>":
        body["model"] = model
    maybe, rarely = _chance(4), _chance(16)
    truncate = st.sampled_from([None, -1, 1, 3, profile.max_model_len, profile.max_model_len + 1, -2])
    if path in (EMBEDDINGS_PATH, POOLING_PATH, CLASSIFY_PATH):
        if draw(_chance(5)):
            body["messages"] = draw(messages(profile, None))
            if draw(maybe):
                body["add_generation_prompt"] = draw(st.booleans())
            if draw(maybe):
                body["continue_final_message"] = draw(st.booleans())
        else:
            body["input"] = draw(pooling_inputs(profile))
        if draw(maybe):
            body["add_special_tokens"] = draw(st.booleans())
        if draw(maybe):
            body["truncate_prompt_tokens"] = draw(truncate)
        if draw(maybe):
            body["request_id"] = draw(identifiers(12))
    if path in (EMBEDDINGS_PATH, POOLING_PATH):
        if draw(maybe):
            body["encoding_format"] = draw(st.sampled_from(["float", "base64", "base64", "bytes", "hex"]))
        if draw(maybe):
            body["embed_dtype"] = draw(st.sampled_from(["float32", "float16", "bfloat16", "fp8_e4m3"]))
        if draw(maybe):
            body["endianness"] = draw(st.sampled_from(["native", "little", "big", "middle"]))
        if draw(maybe):
            body["dimensions"] = draw(st.sampled_from([None, 2, 4, 8, 3, 0, -1, 9, 100]))
        if draw(maybe):
            body["normalize"] = draw(st.none() | st.booleans())
    if path == POOLING_PATH and draw(maybe):
        body["task"] = draw(
            st.sampled_from([None, "embed", "classify", "score", "token_embed", "token_classify", "plugin"])
        )
    # use_activation is refused for embedding models: mostly ask where it applies
    applies = path in (POOLING_PATH, CLASSIFY_PATH) or model == "tiny-cross"
    if path in (POOLING_PATH, CLASSIFY_PATH, *SCORE_PATHS, *RERANK_PATHS) and draw(
        maybe if applies else rarely
    ):
        name = draw(st.sampled_from(["use_activation", "use_activation", "softmax", "activation"]))
        body[name] = draw(st.none() | st.booleans())
    if path in SCORE_PATHS:
        pairs = [("text_1", "text_2")] * 3 + [
            ("queries", "documents"),
            ("queries", "items"),
            ("data_1", "data_2"),
        ]
        first, second = draw(st.sampled_from(pairs))
        some_texts = st.lists(texts(profile, 0), min_size=0 if draw(rarely) else 1, max_size=4)
        body[first] = draw(texts(profile, 0) | some_texts)
        body[second] = draw(texts(profile, 0) | some_texts)
        if draw(rarely):
            del body[draw(st.sampled_from([first, second]))]
        if draw(maybe):
            body["truncate_prompt_tokens"] = draw(truncate)
    if path in RERANK_PATHS:
        body["query"] = draw(texts(profile, 0))
        document = texts(profile, 0) | texts(profile, 0).map(lambda text: {"text": text})
        body["documents"] = draw(st.lists(document, min_size=0 if draw(rarely) else 1, max_size=5))
        if draw(maybe):
            body["top_n"] = draw(st.sampled_from([None, 0, 1, 2, 10, -1]))
        if draw(maybe):
            body["return_documents"] = draw(st.none() | st.booleans())
        if draw(maybe):
            body["max_tokens_per_doc"] = draw(st.integers(1, 4096))
        if draw(maybe):
            body["truncate_prompt_tokens"] = draw(truncate)
    if draw(rarely):
        body["priority"] = draw(st.integers(-3, 3))
    if draw(rarely):  # one field replaced by junk
        name = draw(st.sampled_from(sorted(body) or ["input"]))
        body[name] = draw(junk_values())
    body.update(draw(extra_fields()))
    return body


@functools.cache
@st.composite
def pooling_requests(draw: st.DrawFn, profile: Profile = Profile()) -> FuzzRequest:
    """POSTs to the pooling endpoints (family "pooling")."""
    path = draw(st.sampled_from(POOLING_PATHS))
    body = draw(pooling_bodies(profile, path))
    return FuzzRequest(
        "POST", path, draw(polite_headers()), dumps(body, ascii_only=draw(st.booleans())), "pooling", body
    )


def pooling_rejections(profile: Profile) -> list[tuple[str, dict[str, Any], str]]:
    """(path, body, words of the message): requests the reference answers with a 400."""
    long_text = "x" * profile.max_model_len
    return [
        (EMBEDDINGS_PATH, {"input": "a", "encoding_format": "hex"}, "literal_error"),
        (EMBEDDINGS_PATH, {"input": "a", "embed_dtype": "float64"}, "literal_error"),
        (EMBEDDINGS_PATH, {"input": "a", "endianness": "middle"}, "literal_error"),
        (EMBEDDINGS_PATH, {"input": []}, "cannot be empty"),
        (EMBEDDINGS_PATH, {"input": ""}, "empty string"),
        (EMBEDDINGS_PATH, {"input": ["a", ""]}, "empty string"),
        (EMBEDDINGS_PATH, {"input": [[]]}, "empty list"),
        (EMBEDDINGS_PATH, {"input": [profile.vocab_size]}, "out of vocabulary"),
        (EMBEDDINGS_PATH, {"input": ["a", 1]}, "value_error"),
        (EMBEDDINGS_PATH, {"input": long_text}, "maximum context length"),
        (
            EMBEDDINGS_PATH,
            {"input": "a", "truncate_prompt_tokens": profile.max_model_len + 1},
            "truncate_prompt_tokens",
        ),
        (EMBEDDINGS_PATH, {"input": "a", "truncate_prompt_tokens": -2}, "greater_than_equal"),
        (EMBEDDINGS_PATH, {"input": "a", "priority": 1}, "Priority scheduling"),
        (EMBEDDINGS_PATH, {"model": "tiny-cross", "input": "a"}, "does not support Embeddings API"),
        (EMBEDDINGS_PATH, {"model": "tiny-embed", "input": "a", "dimensions": 3}, "matryoshka dimensions"),
        (EMBEDDINGS_PATH, {"model": "tiny-tokens", "input": "a", "dimensions": 0}, "greater than 0"),
        (EMBEDDINGS_PATH, {"model": "tiny-tokens", "input": "a", "dimensions": 9}, "cannot return"),
        (
            EMBEDDINGS_PATH,
            {
                "messages": [{"role": "user", "content": "a"}],
                "add_generation_prompt": True,
                "continue_final_message": True,
            },
            "continue_final_message",
        ),
        (POOLING_PATH, {"model": "tiny-embed", "input": "a", "task": "classify"}, "is not supported"),
        (
            POOLING_PATH,
            {"model": "tiny-cross", "input": "a", "task": "classify", "dimensions": 2},
            "only supports",
        ),
        (POOLING_PATH, {"model": "tiny-byte-model", "input": "a"}, "does not support Pooling API"),
        (CLASSIFY_PATH, {"model": "tiny-embed", "input": "a"}, "does not support Classification API"),
        (SCORE_PATHS[0], {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "1:1, 1:N or N:N"),
        (SCORE_PATHS[1], {"text_1": "a", "text_2": []}, "At least one"),
        (SCORE_PATHS[0], {"text_1": "a"}, "one pair only"),
        (
            SCORE_PATHS[0],
            {"model": "tiny-embed", "text_1": "a", "text_2": "b", "use_activation": True},
            "only supports",
        ),
        (
            SCORE_PATHS[0],
            {"model": "tiny-byte-model", "text_1": "a", "text_2": "b"},
            "does not support Score API",
        ),
        (RERANK_PATHS[0], {"query": "q", "documents": ["a"], "top_n": -1}, "greater_than_equal"),
        (RERANK_PATHS[1], {"query": "q", "documents": []}, "At least one"),
        (RERANK_PATHS[2], {"query": "q", "documents": [{"title": "no text"}]}, "missing"),
        (
            RERANK_PATHS[2],
            {"model": "tiny-byte-model", "query": "q", "documents": ["a"]},
            "does not support Rerank API",
        ),
        (
            RERANK_PATHS[0],
            {"model": "tiny-cross", "query": "q", "documents": [long_text]},
            "maximum context length",
        ),
    ]
