"""Request bodies of the OpenAI-compatible endpoints, as msgspec Structs.

Field names and defaults follow vLLM's `protocol.py` (see reference/openai-server.md §2). Unknown
fields are accepted and ignored, as vLLM's `extra="allow"` does. Decoding is strict about types
(`"n": "2"` is refused) so that a wrong type is always a 400 naming the field, never a surprise
further down. `__post_init__` only checks shapes msgspec's types cannot express (message objects,
prompt lists) and fills the `tool_choice` default; the semantic rules live in
`protocol.validation`. `decode_request` turns every decoding failure into a pydantic-style 400.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from protocol.errors import ProtocolError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Seed = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
TruncatePromptTokens = Annotated[int, msgspec.Meta(ge=-1)]
JsonObject = dict[str, Any]


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of request parts: keyword-only, unknown keys ignored."""


# ---- parts ----


class StreamOptions(_Request, kw_only=True):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class JsonSchemaResponseFormat(_Request, kw_only=True):
    name: str = "response"
    description: str | None = None
    schema: JsonObject | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class StructuralTagStructure(_Request, kw_only=True):
    begin: str
    schema: JsonObject | None = None
    end: str


class ResponseFormat(_Request, kw_only=True):
    """`response_format`: text, any JSON object, a JSON schema, or a structural tag."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaResponseFormat | None = None
    # structural_tag, current form: {"type": "structural_tag", "format": {...}}
    format: Any = None
    # structural_tag, legacy form: {"type": "structural_tag", "structures": [...], "triggers": [...]}
    structures: list[StructuralTagStructure] | None = None
    triggers: list[str] | None = None


class StructuredOutputsParams(_Request, kw_only=True):
    """vLLM's `structured_outputs`: at most one constraint (checked in `protocol.validation`)."""

    json: str | JsonObject | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


class FunctionDefinition(_Request, kw_only=True):
    name: str
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class ChatCompletionToolsParam(_Request, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionNamedFunction(_Request, kw_only=True):
    name: str


class ChatCompletionNamedToolChoiceParam(_Request, kw_only=True):
    """A named `tool_choice`; the request keeps the raw dict, `named_tool_choice` converts it."""

    type: Literal["function"] = "function"
    function: ChatCompletionNamedFunction


class LogitsProcessorConstructor(_Request, kw_only=True):
    qualname: str
    args: list[Any] | None = None
    kwargs: JsonObject | None = None


# ---- shape checks msgspec types cannot express (run by __post_init__) ----


def _check_messages(messages: list[JsonObject]) -> None:
    """Each message is an object with a string `role` (custom roles allowed) and valid content."""
    for i, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"messages[{i}]: `role` must be a string, got {role!r}")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ValueError(f"messages[{i}]: `content` must be a string, a list of parts or null")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise ValueError(f"messages[{i}].content[{j}]: a content part must be an object")


def _check_prompt(prompt: str | list[Any] | None) -> None:
    """A prompt is a string, a list of strings, a list of token ids, or a list of token-id lists."""
    if prompt is None or isinstance(prompt, str) or not prompt:
        return
    if all(isinstance(p, str) for p in prompt):
        return
    if all(_is_token_id(p) for p in prompt):
        return
    if all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in prompt):
        return
    raise ValueError(
        "`prompt` must be a string, a list of strings, a list of token ids or a list of token-id lists"
    )


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _default_tool_choice(request: ChatCompletionRequest | TokenizeChatRequest) -> None:
    """vLLM's `check_tool_usage` defaulting: absent -> "auto" with tools, else "none"."""
    if request.tool_choice is msgspec.UNSET:
        request.tool_choice = "auto" if request.tools else "none"
    # OpenAI behaviour: "required" with an empty tool list means no tools at all.
    if request.tool_choice == "required" and request.tools is not None and len(request.tools) == 0:
        request.tool_choice = "none"
        request.tools = None


# ---- requests ----
# Chat and completion requests share most sampling fields; they are spelled out in each (as in vLLM)
# so each struct reads as the full field list of its endpoint. Keep the groups in step.


class _GenerationRequest(_Request, kw_only=True):
    """vLLM extra params that chat and completions share, and the legacy `guided_*` aliases."""

    structured_outputs: StructuredOutputsParams | None = None
    priority: int = 0
    request_id: str | None = None  # None: the core injects one
    logits_processors: list[str | LogitsProcessorConstructor] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: JsonObject | None = None
    vllm_xargs: JsonObject | None = None
    # legacy guided decoding (<= v0.10), aliases of structured_outputs
    guided_json: str | JsonObject | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structural_tag: str | None = None


class ChatCompletionRequest(_GenerationRequest, kw_only=True):
    """POST /v1/chat/completions."""

    messages: list[JsonObject]
    model: str | None = None
    # OpenAI fields
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = 0.0
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = msgspec.field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[ChatCompletionToolsParam] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}; filled in __post_init__
    tool_choice: str | JsonObject | None | msgspec.UnsetType = msgspec.UNSET
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    include_reasoning: bool = True
    parallel_tool_calls: bool | None = True
    user: str | None = None
    # vLLM sampling params
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False  # beam search (vLLM v0's field)
    stop_token_ids: list[int] | None = msgspec.field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = msgspec.field(default_factory=list)
    # vLLM extra params
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: JsonObject | None = None
    mm_processor_kwargs: JsonObject | None = None

    def __post_init__(self) -> None:
        _check_messages(self.messages)
        _default_tool_choice(self)


class CompletionRequest(_GenerationRequest, kw_only=True):
    """POST /v1/completions."""

    model: str | None = None
    prompt: str | list[Any] | None = None  # str | list[str] | list[int] | list[list[int]], checked below
    prompt_embeds: str | list[str] | None = None  # base64; not supported, refused in validation
    # OpenAI fields
    best_of: int | None = None
    echo: bool | None = False
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = 16
    n: int | None = 1
    presence_penalty: float | None = 0.0
    seed: Seed | None = None
    stop: str | list[str] | None = msgspec.field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM sampling params
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False  # beam search (vLLM v0's field)
    stop_token_ids: list[int] | None = msgspec.field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    # vLLM extra params
    add_special_tokens: bool = True
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        _check_prompt(self.prompt)


class TokenizeCompletionRequest(_Request, kw_only=True):
    """POST /tokenize with a `prompt`."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_Request, kw_only=True):
    """POST /tokenize with `messages`."""

    model: str | None = None
    messages: list[JsonObject]
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: JsonObject | None = None
    mm_processor_kwargs: JsonObject | None = None
    tools: list[ChatCompletionToolsParam] | None = None
    tool_choice: str | JsonObject | None | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        _check_messages(self.messages)
        _default_tool_choice(self)


class DetokenizeRequest(_Request, kw_only=True):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


def named_tool_choice(request: ChatCompletionRequest) -> ChatCompletionNamedToolChoiceParam | None:
    """The named tool of `tool_choice`, or None when it is a string (call after validation)."""
    if not isinstance(request.tool_choice, dict):
        return None
    return msgspec.convert(request.tool_choice, ChatCompletionNamedToolChoiceParam)


# ---- decoding ----

T = TypeVar("T")


def decode_request(body: bytes, kind: type[T]) -> T:
    """Decode a JSON body into `kind`, or raise `ProtocolError(400)` with pydantic-style text.

    The message names the field, an error-type token as pydantic spells it (`int_parsing`,
    `literal_error`, `greater_than_equal`, `missing`, `json_invalid`, ...) and the offending value,
    because clients and vLLM's tests look for those tokens.
    """
    try:
        return _decoder(kind).decode(body)
    except msgspec.ValidationError as exc:
        # msgspec validates while it parses, so a body that is not JSON at all may fail on a field
        # first: parse it again untyped and report broken JSON before any field.
        try:
            document = msgspec.json.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as json_exc:
            message, param = _describe_json_error(json_exc, kind), None
        else:
            message, param = _describe_validation_error(str(exc), document, kind)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        message, param = _describe_json_error(exc, kind), None
    raise ProtocolError(message, status=400, param=param)


@functools.cache
def _decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    """Lax scalars, as vLLM's pydantic models take them: `"2"` for an int, `"0.5"` for a float,
    `"true"`/`"false"`/`"1"`/`"0"` and 1/0 for a bool, 2.0 for an int. Non-finite floats that a
    string can now spell (`"nan"`, `"inf"`) are refused where they would reach the engine
    (`protocol.validation`)."""
    return msgspec.json.Decoder(kind, strict=False)


def decode_tokenize_request(body: bytes) -> TokenizeRequest:
    """POST /tokenize takes either request shape; a body with `messages` is the chat one."""
    try:
        probe = msgspec.json.decode(body, type=_TokenizeProbe)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        probe = None
    if probe is not None and probe.messages is not msgspec.UNSET:
        return decode_request(body, TokenizeChatRequest)
    return decode_request(body, TokenizeCompletionRequest)


class _TokenizeProbe(msgspec.Struct):
    messages: Any = msgspec.UNSET


# ---- pydantic-style error text ----
# msgspec reports "Expected `int | null`, got `str` - at `$.n`"; vLLM's clients and tests expect
# pydantic's wording and type tokens, so the message is translated and the offending value looked up
# in the body, decoded again as plain JSON (only on this error path).

_AT = re.compile(r"^(?P<msg>.*?) - at `(?P<path>\$[^`]*)`$", re.S)
_TYPE_MISMATCH = re.compile(r"^Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`$")
_BOUND = re.compile(r"^Expected `(?P<expected>[^`]+)` (?P<op>>=|<=|>|<) (?P<bound>\S+)$")
_LENGTH = re.compile(r"^Expected `(?P<expected>[^`]+)` of length (?P<op>>=|<=) (?P<bound>\d+)$")
_ENUM = re.compile(r"^Invalid enum value (?P<value>.+)$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_PATH_STEP = re.compile(r"\.(?P<key>[^.\[]+)|\[(?P<index>\d+)\]|\[\.\.\.\]")

_BOUND_TOKENS = {
    ">=": ("greater_than_equal", "greater than or equal to"),
    "<=": ("less_than_equal", "less than or equal to"),
    ">": ("greater_than", "greater than"),
    "<": ("less_than", "less than"),
}
_JSON_TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "array": list, "object": dict}


class _Missing:
    """No value at the error's location (a missing field, or a dict key msgspec does not name)."""


def _describe_validation_error(text: str, document: Any, kind: type) -> tuple[str, str | None]:
    match = _AT.match(text)
    message, path = (match["msg"], match["path"]) if match else (text, "$")
    loc: list[str | int] = _parse_path(path)
    value = _lookup(document, loc)
    if missing := _MISSING.match(message):
        loc.append(missing["field"])
        token, msg = "missing", "Field required"
    else:
        token, msg = _translate(message, value, kind, loc)
    return _pydantic_text(kind, loc, token, msg, value), ".".join(str(step) for step in loc) or None


def _translate(message: str, value: Any, kind: type, loc: list[str | int]) -> tuple[str, str]:
    """msgspec's message -> (pydantic type token, pydantic message)."""
    if match := _TYPE_MISMATCH.match(message):
        expected = [t for t in match["expected"].split(" | ") if t != "null"]
        return _type_error(expected[0] if expected else "null", match["got"], kind, loc)
    if match := _BOUND.match(message):
        token, words = _BOUND_TOKENS[match["op"]]
        return token, f"Input should be {words} {match['bound']}"
    if match := _LENGTH.match(message):
        unit = "character" if match["expected"] == "str" else "item"
        prefix = "string_" if match["expected"] == "str" else ""
        if match["op"] == ">=":
            return f"{prefix}too_short", f"Value should have at least {match['bound']} {unit}s"
        return f"{prefix}too_long", f"Value should have at most {match['bound']} {unit}s"
    if _ENUM.match(message):
        allowed = _literal_values(kind, loc)
        if allowed:
            names = [repr(v) for v in allowed]
            listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
            return "literal_error", f"Input should be {listed}"
        return "literal_error", "Input should be one of the allowed values"
    if message == "Number out of range":
        return "finite_number", "Input should be a finite number"
    return "value_error", f"Value error, {message}"


def _type_error(expected: str, got: str, kind: type, loc: list[str | int]) -> tuple[str, str]:
    if expected == "int":
        if got == "str":
            return "int_parsing", "Input should be a valid integer, unable to parse string as an integer"
        if got == "float":
            return "int_from_float", "Input should be a valid integer, got a number with a fractional part"
        return "int_type", "Input should be a valid integer"
    if expected == "float":
        if got == "str":
            return "float_parsing", "Input should be a valid number, unable to parse string as a number"
        return "float_type", "Input should be a valid number"
    if expected == "str":
        return "string_type", "Input should be a valid string"
    if expected == "bool":
        if got == "str":
            return "bool_parsing", "Input should be a valid boolean, unable to interpret input"
        return "bool_type", "Input should be a valid boolean"
    if expected == "array":
        return "list_type", "Input should be a valid list"
    if expected == "object":
        if any(isinstance(t, msgspec.inspect.StructType) for t in _strip_union(_type_at(kind, loc))):
            return (
                "model_attributes_type",
                "Input should be a valid dictionary or object to extract fields from",
            )
        return "dict_type", "Input should be a valid dictionary"
    if expected == "null":
        return "none_required", "Input should be None"
    return f"{expected}_type", f"Input should be a valid {expected}"


def _type_at(kind: type, loc: list[str | int]) -> msgspec.inspect.Type | None:
    """The declared type at `loc` inside `kind`, following structs, lists, dicts and unions."""
    current: msgspec.inspect.Type | None = msgspec.inspect.type_info(kind)
    for step in loc:
        current = _step_into(current, step)
        if current is None:
            return None
    return _strip(current)


def _step_into(current: msgspec.inspect.Type | None, step: str | int) -> msgspec.inspect.Type | None:
    candidates = _strip_union(current)
    for candidate in candidates:
        if isinstance(step, str) and isinstance(candidate, msgspec.inspect.StructType):
            for field in candidate.fields:
                if field.encode_name == step:
                    return field.type
        if isinstance(step, int) and isinstance(
            candidate, msgspec.inspect.ListType | msgspec.inspect.VarTupleType
        ):
            return candidate.item_type
    return None


def _strip(t: msgspec.inspect.Type) -> msgspec.inspect.Type:
    while isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    return t


def _strip_union(t: msgspec.inspect.Type | None) -> list[msgspec.inspect.Type]:
    if t is None:
        return []
    t = _strip(t)
    if isinstance(t, msgspec.inspect.UnionType):
        return [_strip(member) for member in t.types]
    return [t]


def _literal_values(kind: type, loc: list[str | int]) -> tuple[Any, ...]:
    for candidate in _strip_union(_type_at(kind, loc)):
        if isinstance(candidate, msgspec.inspect.LiteralType):
            return candidate.values
    return ()


def _parse_path(path: str) -> list[str | int]:
    """`$.messages[0].role` -> ["messages", 0, "role"]; stops at a dict key msgspec does not name."""
    loc: list[str | int] = []
    for step in _PATH_STEP.finditer(path[1:]):
        if step["key"] is not None:
            loc.append(step["key"])
        elif step["index"] is not None:
            loc.append(int(step["index"]))
        else:
            break
    return loc


def _lookup(document: Any, loc: list[str | int]) -> Any:
    current = document
    for step in loc:
        if isinstance(step, str) and isinstance(current, dict) and step in current:
            current = current[step]
        elif isinstance(step, int) and isinstance(current, list) and 0 <= step < len(current):
            current = current[step]
        else:
            return _Missing()
    return current


def _describe_json_error(exc: Exception, kind: type) -> str:
    if isinstance(exc, UnicodeDecodeError):
        detail = f"Invalid UTF-8 at byte {exc.start}"
    elif isinstance(exc, RecursionError):
        detail = "the JSON is nested too deeply"
    else:
        detail = str(exc)
    return _pydantic_text(kind, [], "json_invalid", f"JSON decode error: {detail}", _Missing())


def _pydantic_text(kind: type, loc: list[str | int], token: str, msg: str, value: Any) -> str:
    """pydantic's `str(ValidationError)` followed by its `errors()` list, as FastAPI reports them."""
    where = ".".join(str(step) for step in loc) or "body"
    detail = f"[type={token}"
    if not isinstance(value, _Missing):
        detail += f", input_value={_short_repr(value)}, input_type={_py_type_name(value)}"
    detail += "]"
    error: dict[str, Any] = {"type": token, "loc": ("body", *loc), "msg": msg}
    if not isinstance(value, _Missing):
        error["input"] = value
    errors = _short_repr([error], limit=1000)
    return f"1 validation error for {kind.__name__}\n{where}\n  {msg} {detail} {errors}"


def _py_type_name(value: Any) -> str:
    return type(value).__name__ if value is not None else "NoneType"


def _short_repr(value: Any, limit: int = 100) -> str:
    """pydantic shortens long inputs in its message the same way (head ... tail)."""
    try:
        text = repr(value)
    except RecursionError:
        return "<nested too deeply to show>"
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]}...{text[-half:]}"
