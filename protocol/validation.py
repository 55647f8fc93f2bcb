"""The request rules of vLLM's server, as pure functions, and the mapping to `SamplingParams`.

Each check raises `ProtocolError` (400 unless noted) with vLLM's message, so clients see the same
text. The rules come from reference/openai-server.md §2: the request validators, the engine-side
checks (`SamplingParams._verify_args`, the input processor) and the context-length checks. The
`*_sampling_params` functions run every rule that applies and return the engine's view of the
request; the app calls them once it knows the prompt length.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Literal

from protocol.engine_api import SamplingParams, StructuredOutput
from protocol.errors import ProtocolError
from protocol.model import ServedModel
from protocol.requests import (
    INT64_MAX,
    INT64_MIN,
    ChatCompletionRequest,
    CompletionRequest,
    StructuredOutputsParams,
    TokenizeChatRequest,
)
from protocol.tokenizer import Tokenizer

# vLLM's `_DEFAULT_SAMPLING_PARAMS`; a model's generation_config overrides them.
_DEFAULT_SAMPLING_PARAMS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
}
_GREEDY_EPS = 1e-5
_LOGIT_BIAS_LIMIT = 100.0


def _bad(message: str, param: str | None = None) -> ProtocolError:
    return ProtocolError(message, status=400, param=param)


# ---- models ----


def resolve_model(requested: str | None, models: Sequence[ServedModel]) -> ServedModel:
    """The served model a request names; None or "" means the first one. Unknown: 404."""
    if not requested:
        if not models:
            raise ProtocolError("No model is being served.", status=404, param="model")
        return models[0]
    for model in models:
        if requested in model.names:
            return model
    for model in models:
        if requested in model.lora_modules:
            return model.adapter(requested)
    raise ProtocolError(f"The model `{requested}` does not exist.", status=404, param="model")


# ---- request validators (vLLM's model validators) ----


def check_stream_options(stream: bool | None, stream_options: object | None) -> None:
    if stream_options is not None and not stream:
        raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")


def check_prompt_logprobs(prompt_logprobs: int | None, stream: bool | None) -> None:
    if prompt_logprobs is None:
        return
    if stream and (prompt_logprobs > 0 or prompt_logprobs == -1):
        raise _bad("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
    if prompt_logprobs < 0 and prompt_logprobs != -1:
        raise _bad("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs")


def check_chat_logprobs(logprobs: bool | None, top_logprobs: int | None) -> None:
    if top_logprobs is None:
        return
    if top_logprobs < 0 and top_logprobs != -1:
        raise _bad("`top_logprobs` must be a positive value or -1.", "top_logprobs")
    if (top_logprobs == -1 or top_logprobs > 0) and not logprobs:
        raise _bad("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")


def check_completion_logprobs(logprobs: int | None) -> None:
    if logprobs is not None and logprobs < 0:
        raise _bad("`logprobs` must be a positive value.", "logprobs")


def check_generation_prompt(add_generation_prompt: bool, continue_final_message: bool) -> None:
    if add_generation_prompt and continue_final_message:
        raise _bad(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            "continue_final_message",
        )


def check_cache_salt(cache_salt: object) -> None:
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise _bad("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")


def check_priority(priority: int, allow_priority: bool = False) -> None:
    if priority != 0 and not allow_priority:
        raise _bad(f"Got priority {priority} but Priority scheduling is not enabled.", "priority")


def check_seed(seed: int | None) -> None:
    """Decoding already bounds `seed`; this covers requests built in Python."""
    if seed is None:
        return
    if seed < INT64_MIN:
        raise _bad(f"Input should be greater than or equal to {INT64_MIN} [type=greater_than_equal]", "seed")
    if seed > INT64_MAX:
        raise _bad(f"Input should be less than or equal to {INT64_MAX} [type=less_than_equal]", "seed")


def check_logits_processors(logits_processors: list[Any] | None) -> None:
    if logits_processors:
        raise _bad(
            "The `logits_processors` argument is not supported by this server. "
            "See --logits-processor-pattern engine argument for more information.",
            "logits_processors",
        )


_CORRECT_TOOL_CHOICE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def check_tool_usage(request: ChatCompletionRequest | TokenizeChatRequest) -> None:
    """vLLM's `check_tool_usage` (the defaults were filled when the request was decoded)."""
    choice = request.tool_choice
    if choice == "none" or choice is None:
        return
    if request.tools is None:
        raise _bad("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise _bad(
            f"Invalid value for `tool_choice`: {choice}! "
            'Only named tools, "none", "auto" or "required" are supported.',
            "tool_choice",
        )
    if not isinstance(choice, dict):
        return
    function = choice.get("function")
    if not isinstance(function, dict):
        raise _bad(
            f"Invalid value for `function`: `{function}` in `tool_choice`! {_CORRECT_TOOL_CHOICE}",
            "tool_choice",
        )
    if "name" not in function:
        raise _bad(
            f"Expected field `name` in `function` in `tool_choice`! {_CORRECT_TOOL_CHOICE}", "tool_choice"
        )
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise _bad(
            f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_CORRECT_TOOL_CHOICE}", "tool_choice"
        )
    if not any(tool.function.name == name for tool in request.tools):
        raise _bad(
            "The tool specified in `tool_choice` does not match any of the specified `tools`", "tool_choice"
        )


def check_auto_tool_choice(request: ChatCompletionRequest, *, enabled: bool) -> None:
    """`tool_choice: "auto"` (the default when `tools` are given) needs a tool parser, as in vLLM:
    answering without one would silently drop every call the model makes."""
    if request.tool_choice == "auto" and request.tools is not None and not enabled:
        raise _bad(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
            "tool_choice",
        )


def check_stop(stop: str | list[str] | None) -> None:
    if stop == "" or (isinstance(stop, list) and "" in stop):
        raise _bad("stop cannot contain an empty string.", "stop")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """`stop` as a list (a bare string is one stop string)."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_chat_request(request: ChatCompletionRequest, *, allow_priority: bool = False) -> None:
    """The rules that need neither the model nor the prompt."""
    check_stream_options(request.stream, request.stream_options)
    check_prompt_logprobs(request.prompt_logprobs, request.stream)
    check_chat_logprobs(request.logprobs, request.top_logprobs)
    check_tool_usage(request)
    check_generation_prompt(request.add_generation_prompt, request.continue_final_message)
    check_cache_salt(request.cache_salt)
    check_priority(request.priority, allow_priority)
    check_seed(request.seed)
    check_stop(request.stop)
    check_logits_processors(request.logits_processors)
    _check_n(request.n, request.best_of)
    structured_output(request)  # at most one constraint, well-formed


def check_completion_request(request: CompletionRequest, *, allow_priority: bool = False) -> None:
    """The rules that need neither the model nor the prompt."""
    if request.suffix is not None:
        raise _bad("suffix is not currently supported", "suffix")
    if request.prompt_embeds is not None:
        raise _bad("You must set `--enable-prompt-embeds` to input `prompt_embeds`.", "prompt_embeds")
    if request.prompt is None or len(request.prompt) == 0:
        raise _bad("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    check_stream_options(request.stream, request.stream_options)
    check_prompt_logprobs(request.prompt_logprobs, request.stream)
    check_completion_logprobs(request.logprobs)
    check_cache_salt(request.cache_salt)
    check_priority(request.priority, allow_priority)
    check_seed(request.seed)
    check_stop(request.stop)
    check_logits_processors(request.logits_processors)
    _check_n(request.n, request.best_of)
    structured_output(request)


def check_tokenize_chat_request(request: TokenizeChatRequest) -> None:
    check_generation_prompt(request.add_generation_prompt, request.continue_final_message)
    check_tool_usage(request)


MAX_N = 128  # OpenAI's own cap; each sample is a sequence, so an unbounded n is a denial of service


def _check_n(n: int | None, best_of: int | None) -> None:
    n = 1 if n is None else n
    if n < 1:
        raise _bad(f"n must be at least 1, got {n}.", "n")
    if n > MAX_N:
        raise _bad(f"n must be at most {MAX_N}, got {n}.", "n")
    if best_of is not None and best_of > MAX_N:
        raise _bad(f"best_of must be at most {MAX_N}, got {best_of}.", "best_of")
    if best_of is not None and best_of < n:
        raise _bad(f"best_of must be greater than or equal to n, got n={n} and best_of={best_of}.", "best_of")


# ---- prompt and context length ----


def check_prompt_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    """The engine's input checks: a prompt must not be empty and every id must be in the vocabulary."""
    if not token_ids:
        raise _bad("The decoder prompt cannot be empty", "prompt")
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise _bad(f"Token id {token_id} is out of vocabulary", "prompt")


def check_context_length(
    prompt_len: int,
    max_tokens_requested: int | None,
    max_model_len: int,
    kind: Literal["chat", "completion"],
) -> None:
    """vLLM's `_validate_input`: the prompt must leave room, and so must the requested max_tokens."""
    if prompt_len >= max_model_len:
        raise _bad(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the input messages.",
            "messages" if kind == "chat" else "prompt",
        )
    if max_tokens_requested is not None and prompt_len + max_tokens_requested > max_model_len:
        raise _bad(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens_requested}. This model's "
            f"maximum context length is {max_model_len} tokens and your request has {prompt_len} input "
            f"tokens ({max_tokens_requested} > {max_model_len} - {prompt_len}).",
            "max_tokens",
        )


def truncation_length(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """How many prompt tokens to keep (from the end); None: no truncation. -1 means max_model_len."""
    if truncate_prompt_tokens is None:
        return None
    if truncate_prompt_tokens == -1:
        return max_model_len
    if truncate_prompt_tokens > max_model_len:
        raise _bad(
            f"truncate_prompt_tokens value ({truncate_prompt_tokens}) is greater than max_model_len "
            f"({max_model_len}). Please, select a smaller truncation size.",
            "truncate_prompt_tokens",
        )
    return truncate_prompt_tokens


# ---- structured outputs ----


def structured_output(request: ChatCompletionRequest | CompletionRequest) -> StructuredOutput | None:
    """`structured_outputs`, the legacy `guided_*` fields and `response_format`, as one constraint.

    A named or "required" `tool_choice` is not included here: see `tool_choice_schema`.
    """
    params = request.structured_outputs or StructuredOutputsParams()
    constraints: dict[str, Any] = {}
    for key, value in (
        ("json", params.json),
        ("regex", params.regex),
        ("choice", params.choice),
        ("grammar", params.grammar),
        ("json_object", params.json_object or None),
        ("structural_tag", params.structural_tag),
        ("json", request.guided_json),
        ("regex", request.guided_regex),
        ("choice", request.guided_choice),
        ("grammar", request.guided_grammar),
        ("structural_tag", request.structural_tag),
    ):
        if value is not None:
            _add_constraint(constraints, key, value)
    if request.response_format is not None:
        for key, value in _response_format_constraint(request).items():
            _add_constraint(constraints, key, value)
    whitespace = request.guided_whitespace_pattern or params.whitespace_pattern
    _check_backend(request.guided_decoding_backend)
    if not constraints:
        return None
    if "structural_tag" in constraints:
        raise _bad("Structural tag constraints are not supported by this server.", "structural_tag")
    kind, value = next(iter(constraints.items()))
    options: dict[str, Any] = {
        "whitespace_pattern": whitespace,
        "disable_any_whitespace": params.disable_any_whitespace,
        "disable_additional_properties": params.disable_additional_properties,
        "backend": "outlines" if request.guided_decoding_backend == "outlines" else None,
    }
    if kind == "json":
        return StructuredOutput(json=_schema_text(value), **options)
    if kind == "regex":
        return StructuredOutput(regex=value, **options)
    if kind == "choice":
        if not value:
            raise _bad("The `choice` constraint needs at least one choice.", "structured_outputs")
        return StructuredOutput(choice=tuple(value), **options)
    if kind == "grammar":
        return StructuredOutput(grammar=value, **options)
    return StructuredOutput(json_object=True, **options)


# outlines-core compiles JSON schemas, regexes and choices; llguidance (outlines' grammar backend)
# compiles grammars, whatever backend is named. vLLM's backend names are accepted so its clients work
# unchanged (the output obeys the same constraint); an unknown name is a typo worth a 400.
GUIDED_DECODING_BACKENDS = ("auto", "outlines", "guidance", "llguidance", "xgrammar", "lm-format-enforcer")


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in GUIDED_DECODING_BACKENDS:
        raise _bad(
            f"guided_decoding_backend {backend!r} is not available on this server; "
            f"use one of {', '.join(GUIDED_DECODING_BACKENDS)} (all run on outlines here).",
            "guided_decoding_backend",
        )


def _add_constraint(constraints: dict[str, Any], key: str, value: Any) -> None:
    if constraints and (key not in constraints or constraints[key] != value):
        kinds = sorted({*constraints, key})
        raise _bad(
            "You can only use one kind of structured outputs constraint but multiple are specified: "
            f"{', '.join(kinds)}",
            "structured_outputs",
        )
    constraints[key] = value


def _response_format_constraint(request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    response_format = request.response_format
    assert response_format is not None
    if response_format.type == "json_object":
        return {"json_object": True}
    if response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise _bad(
                "When response_format type is 'json_schema', the 'json_schema' field must be provided.",
                "response_format",
            )
        if response_format.json_schema.schema is None:
            raise _bad("response_format.json_schema needs a `schema`.", "response_format")
        return {"json": response_format.json_schema.schema}
    if response_format.type == "structural_tag":
        return {"structural_tag": True}
    return {}


def _schema_text(schema: str | dict[str, Any]) -> str:
    """A JSON schema as the engine takes it (serialized); a string must hold a JSON schema."""
    if isinstance(schema, dict):
        return json.dumps(schema)
    try:
        parsed = json.loads(schema)
    except ValueError:
        raise _bad(
            "The JSON schema of `structured_outputs` is not valid JSON.", "structured_outputs"
        ) from None
    if not isinstance(parsed, dict | bool):
        raise _bad("The JSON schema of `structured_outputs` must be an object.", "structured_outputs")
    return schema


def tool_choice_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema that a named or "required" `tool_choice` constrains the output to, or None.

    Named: the tool's parameters. Required: an array of `{name, parameters}` objects, one of the
    tools each, with the tools' `$defs` merged at the top (as vLLM's `get_json_schema_from_tools`).
    """
    if request.tools is None:
        return None
    if isinstance(request.tool_choice, dict):
        name = request.tool_choice.get("function", {}).get("name")
        for tool in request.tools:
            if tool.function.name == name:
                return tool.function.parameters or {"type": "object", "properties": {}}
        return None
    if request.tool_choice != "required":
        return None
    defs: dict[str, Any] = {}
    options = []
    for tool in request.tools:
        parameters = dict(tool.function.parameters or {"type": "object", "properties": {}})
        defs.update(parameters.pop("$defs", {}))
        options.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}
    if defs:
        schema["$defs"] = defs
    return schema


# ---- token-space parameters ----


def logit_bias_ids(logit_bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """Keys are token ids written as strings; biases are clamped to [-100, 100] as vLLM does."""
    if not logit_bias:
        return None
    parsed: dict[int, float] = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise _bad(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias") from None
        if math.isnan(bias):  # lax decoding reads "nan"; clamping keeps +-inf finite
            raise _bad(f"logit_bias values must be numbers, got {bias}.", "logit_bias")
        parsed[token_id] = min(_LOGIT_BIAS_LIMIT, max(-_LOGIT_BIAS_LIMIT, bias))
    invalid = [token_id for token_id in parsed if not 0 <= token_id < vocab_size]
    if invalid:
        raise _bad(
            f"token_id(s) {invalid} in logit_bias contain out-of-vocab token ids. Vocabulary size: {vocab_size}",
            "logit_bias",
        )
    return parsed


def allowed_token_ids(token_ids: list[int] | None, vocab_size: int) -> tuple[int, ...] | None:
    if token_ids is None:
        return None
    if not token_ids:
        raise _bad("allowed_token_ids is not None and empty!", "allowed_token_ids")
    if any(not 0 <= token_id < vocab_size for token_id in token_ids):
        raise _bad("allowed_token_ids contains out-of-vocab token id!", "allowed_token_ids")
    return tuple(token_ids)


def bad_words_token_ids(bad_words: list[str], tokenizer: Tokenizer) -> tuple[tuple[int, ...], ...] | None:
    """Each bad word as token ids, also with a leading space when that tokenizes differently (as vLLM)."""
    sequences: list[tuple[int, ...]] = []
    for word in bad_words:
        previous: tuple[int, ...] | None = None
        for prefix in ("", " "):
            ids = tuple(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
            if not ids:
                continue
            # The spaced form counts only when it is a different first token of the same length.
            if previous is None or (ids[0] != previous[0] and len(ids) == len(previous)):
                sequences.append(ids)
            previous = previous or ids
    return tuple(sequences) or None


def _logprobs_count(requested: int | None, vocab_size: int, max_logprobs: int, what: str) -> int | None:
    if requested is None:
        return None
    count = vocab_size if requested == -1 else requested
    limit = vocab_size if max_logprobs == -1 else max_logprobs
    if count < 0:
        raise _bad(f"{what} logprobs must be non-negative or -1, got {requested}.", f"{what}_logprobs")
    if count > limit:
        raise _bad(
            f"Requested {what} logprobs of {count}, which is greater than max allowed: {limit}",
            "logprobs" if what == "sample" else "prompt_logprobs",
        )
    return count


def _max_tokens(requested: int | None, model: ServedModel, prompt_len: int) -> int:
    """vLLM's `get_max_tokens`: the smallest of what is left of the context, the request, the model default."""
    candidates = [model.max_model_len - prompt_len]
    if requested is not None:
        candidates.append(requested)
    default = model.generation_defaults.get("max_tokens")
    if isinstance(default, int):
        candidates.append(default)
    return min(candidates)


def _default(request_value: Any, name: str, model: ServedModel) -> Any:
    if request_value is not None:
        return request_value
    return model.generation_defaults.get(name, _DEFAULT_SAMPLING_PARAMS[name])


def _sampling_params(
    request: ChatCompletionRequest | CompletionRequest,
    model: ServedModel,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    bad_words: tuple[tuple[int, ...], ...] | None,
    structured: StructuredOutput | None,
) -> SamplingParams:
    """The engine-side checks shared by chat and completions, then the SamplingParams."""
    n = 1 if request.n is None else request.n
    temperature = float(_default(request.temperature, "temperature", model))
    top_p = float(_default(request.top_p, "top_p", model))
    top_k = int(_default(request.top_k, "top_k", model))
    min_p = float(_default(request.min_p, "min_p", model))
    repetition_penalty = float(_default(request.repetition_penalty, "repetition_penalty", model))
    presence_penalty = 0.0 if request.presence_penalty is None else request.presence_penalty
    frequency_penalty = 0.0 if request.frequency_penalty is None else request.frequency_penalty
    vocab_size = model.tokenizer.vocab_size

    for name, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("min_p", min_p),
        ("repetition_penalty", repetition_penalty),
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
        ("length_penalty", request.length_penalty),
    ):
        if not math.isfinite(value):  # lax decoding reads "nan" and "inf" from strings
            raise _bad(f"{name} must be a finite number, got {value}.", name)
    if not -2.0 <= presence_penalty <= 2.0:
        raise _bad(f"presence_penalty must be in [-2, 2], got {presence_penalty}.", "presence_penalty")
    if not -2.0 <= frequency_penalty <= 2.0:
        raise _bad(f"frequency_penalty must be in [-2, 2], got {frequency_penalty}.", "frequency_penalty")
    if repetition_penalty <= 0.0:
        raise _bad(
            f"repetition_penalty must be greater than zero, got {repetition_penalty}.", "repetition_penalty"
        )
    if temperature < 0.0:
        raise _bad(f"temperature must be non-negative, got {temperature}.", "temperature")
    if not 0.0 < top_p <= 1.0:
        raise _bad(f"top_p must be in (0, 1], got {top_p}.", "top_p")
    if top_k < -1:
        raise _bad(f"top_k must be 0 (disable), or at least 1, got {top_k}.", "top_k")
    if not 0.0 <= min_p <= 1.0:
        raise _bad(f"min_p must be in [0, 1], got {min_p}.", "min_p")
    if max_tokens < 1:
        raise _bad(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if request.min_tokens < 0:
        raise _bad(f"min_tokens must be greater than or equal to 0, got {request.min_tokens}.", "min_tokens")
    if request.min_tokens > max_tokens:
        raise _bad(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {request.min_tokens}.",
            "min_tokens",
        )
    if temperature < _GREEDY_EPS and n > 1 and not request.use_beam_search:
        raise _bad(f"n must be 1 when using greedy sampling, got {n}.", "n")
    if temperature < _GREEDY_EPS and (request.best_of or 1) > 1 and not request.use_beam_search:
        raise _bad(f"best_of must be 1 when using greedy sampling, got {request.best_of}.", "best_of")

    return SamplingParams(
        max_tokens=max_tokens,
        n=n,
        best_of=request.best_of,
        use_beam_search=request.use_beam_search,
        length_penalty=request.length_penalty,
        early_stopping=request.early_stopping,
        temperature=temperature,
        top_p=top_p,
        top_k=0 if top_k == -1 else top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logit_bias=logit_bias_ids(request.logit_bias, vocab_size),
        allowed_token_ids=allowed_token_ids(request.allowed_token_ids, vocab_size),
        bad_words_token_ids=bad_words,
        seed=request.seed,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        structured=structured,
    )


def chat_sampling_params(
    request: ChatCompletionRequest,
    model: ServedModel,
    prompt_len: int,
    max_logprobs: int,
    *,
    allow_priority: bool = False,
) -> SamplingParams:
    """Validate a chat request against the model and its rendered prompt; map it to SamplingParams.

    A named or "required" `tool_choice` constrains the output to `tool_choice_schema`, as vLLM's
    tool-aware servers do; that replaces any other JSON constraint.
    """
    check_chat_request(request, allow_priority=allow_priority)
    requested = (
        request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    )
    check_context_length(prompt_len, requested, model.max_model_len, "chat")
    vocab_size = model.tokenizer.vocab_size
    top_logprobs = 0 if request.top_logprobs is None else request.top_logprobs
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and request.echo:
        prompt_logprobs = top_logprobs
    structured = structured_output(request)
    tool_schema = tool_choice_schema(request)
    if tool_schema is not None:
        structured = StructuredOutput(
            json=json.dumps(tool_schema),
            whitespace_pattern=structured.whitespace_pattern if structured else None,
            disable_any_whitespace=structured.disable_any_whitespace if structured else False,
        )
    return _sampling_params(
        request,
        model,
        max_tokens=_max_tokens(requested, model, prompt_len),
        logprobs=_logprobs_count(
            top_logprobs if request.logprobs else None, vocab_size, max_logprobs, "sample"
        ),
        prompt_logprobs=_logprobs_count(prompt_logprobs, vocab_size, max_logprobs, "prompt"),
        bad_words=bad_words_token_ids(request.bad_words, model.tokenizer),
        structured=structured,
    )


def completion_sampling_params(
    request: CompletionRequest,
    model: ServedModel,
    prompt_len: int,
    max_logprobs: int,
    *,
    allow_priority: bool = False,
) -> SamplingParams:
    """Validate one prompt of a completion request and map it to SamplingParams.

    `echo` with `max_tokens=0` asks only for the prompt: the engine still runs one step
    (max_tokens=1) and the caller drops the generated token, as vLLM does.
    """
    check_completion_request(request, allow_priority=allow_priority)
    check_context_length(prompt_len, request.max_tokens, model.max_model_len, "completion")
    vocab_size = model.tokenizer.vocab_size
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and request.echo:
        prompt_logprobs = request.logprobs
    max_tokens = _max_tokens(request.max_tokens, model, prompt_len)
    if request.echo and request.max_tokens == 0:
        max_tokens = 1
    return _sampling_params(
        request,
        model,
        max_tokens=max_tokens,
        logprobs=_logprobs_count(request.logprobs, vocab_size, max_logprobs, "sample"),
        prompt_logprobs=_logprobs_count(prompt_logprobs, vocab_size, max_logprobs, "prompt"),
        bad_words=None,
        structured=structured_output(request),
    )
