"""Chat templates: OpenAI messages in, the model's prompt text out, rendered like HF transformers.

Templates come from model repositories or from requests (`chat_template`), so they are untrusted
code: they run in jinja2's immutable sandbox with exactly the helpers HF's `apply_chat_template`
gives them, and any failure while compiling or rendering is the request's fault (a 400), never a
500. Message normalization follows vLLM's `parse_chat_messages`: content becomes a string or a list
of OpenAI parts depending on what the template loops over (`content_format`).

Nothing here does IO: reading a `--chat-template` file is the CLI's job (`looks_like_file_path`
tells it whether the flag holds a path), and the clock behind `strftime_now` is injected.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import msgspec

from protocol.errors import ProtocolError
from protocol.media.parts import MEDIA_PARTS, PYTHON_ONLY_PARTS, MediaCollector

__all__ = [
    "CHATML_TEMPLATE",
    "ChatTemplate",
    "ContentFormat",
    "looks_like_file_path",
    "normalize_messages",
]

ContentFormat = Literal["string", "openai"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Plain ChatML, the fallback for a model that ships no template (same text as
examples/template_chatml.jinja)."""

_JINJA_CHARS = "{}\n"


def looks_like_file_path(value: str) -> bool:
    """vLLM's rule for `--chat-template`: a value with no `{`, `}` or newline is a path, not a template."""
    return not any(char in value for char in _JINJA_CHARS)


# --------------------------------------------------------------------------------------------------
# The sandboxed environment, configured like transformers' `_compile_jinja_template`
# --------------------------------------------------------------------------------------------------


class _RaisedByTemplate(jinja2.TemplateError):
    """`raise_exception(...)` in a template: its message is meant for the client, verbatim."""


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's `tojson`: no HTML escaping, non-ASCII kept, indent/separators/sort_keys exposed.

    Stdlib json rather than msgspec because the output must be byte-identical to HF's
    (`", "` / `": "` separators), which is what models were trained on.
    """
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type itself (HF's TemplateDict)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so templates cannot reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts HF's `{% generation %}...{% endgeneration %}` (assistant-token masks) and renders its body.

    Training templates use the tag; without the extension they would not even compile.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _make_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    # `strftime_now` is bound per render from the template's injected clock.
    return env


_ENV = _make_environment()


@lru_cache(maxsize=64)
def _compile(source: str) -> tuple[jinja2.Template, ContentFormat]:
    """Compile once per distinct source: a request's own template is usually sent again and again."""
    try:
        template = _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""
        raise ProtocolError(f"Invalid chat template: {exc.message}{where}", param="chat_template") from None
    except Exception as exc:  # e.g. RecursionError on absurd nesting: still the sender's template
        raise ProtocolError(f"Invalid chat template: {exc}", param="chat_template") from None
    return template, _detect_content_format(source)


# --------------------------------------------------------------------------------------------------
# Content format detection (vLLM's `_detect_content_format`)
# --------------------------------------------------------------------------------------------------


class _UnusualTarget(Exception):
    """A loop or assignment target the walk cannot follow; vLLM asserts here and falls back to "string"."""


def _is_var_access(node: jinja2.nodes.Node, varname: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == varname


def _is_attr_access(node: jinja2.nodes.Node, varname: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return (
            _is_var_access(node.node, varname)
            and isinstance(node.arg, jinja2.nodes.Const)
            and node.arg.value == key
        )
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_var_access(node.node, varname) and node.attr == key
    return False


def _is_var_or_elems_access(node: jinja2.nodes.Node, varname: str, key: str | None = None) -> bool:
    """`varname` (or `varname[key]`), possibly through filters, tests or a slice."""
    if isinstance(node, jinja2.nodes.Filter):
        return node.node is not None and _is_var_or_elems_access(node.node, varname, key)
    if isinstance(node, jinja2.nodes.Test):
        return _is_var_or_elems_access(node.node, varname, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _is_var_or_elems_access(node.node, varname, key)
    return _is_attr_access(node, varname, key) if key else _is_var_access(node, varname)


def _target_name(target: jinja2.nodes.Node) -> str:
    if not isinstance(target, jinja2.nodes.Name):
        raise _UnusualTarget
    return target.name


def _names_assigned_from(root: jinja2.nodes.Template, varname: str) -> Iterator[str]:
    """`varname` and, breadth first, every variable `{% set %}` from it (e.g. `loop_messages`)."""
    yield varname
    pending = deque([varname])
    while pending:
        source = pending.popleft()
        for assign in root.find_all(jinja2.nodes.Assign):
            if _is_var_or_elems_access(assign.node, source):
                name = _target_name(assign.target)
                yield name
                if name != source:  # `{% set messages = messages[1:] %}` must not loop forever
                    pending.append(name)


def _loop_targets_over(root: jinja2.nodes.Template, varnames: list[str], key: str | None) -> Iterator[str]:
    for loop in root.find_all(jinja2.nodes.For):
        if any(_is_var_or_elems_access(loop.iter, varname, key) for varname in varnames):
            yield _target_name(loop.target)


def _detect_content_format(source: str) -> ContentFormat:
    """Detect "openai" when the template loops over a message's `content` (it expects a list of parts)."""
    try:
        root = _ENV.parse(source)
        messages_names = list(_names_assigned_from(root, "messages"))
        message_names = list(_loop_targets_over(root, messages_names, None))
        next(_loop_targets_over(root, message_names, "content"))
    except StopIteration:
        return "string"
    except Exception:  # unparsable or an unusual target: vLLM's default
        return "string"
    return "openai"


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

# transformers appends this to the final message's text and cuts the rendered prompt there.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_FORBIDDEN_KWARGS = ("chat_template", "tokenize")


def _plain(value: Any) -> Any:
    """A private copy made of plain JSON types only, like HF's `_plain_template_data`.

    The copy lets the continue tag be appended without touching the caller's messages, and the
    sandbox only ever sees objects whose methods it knows are harmless.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, msgspec.Struct):
        return _plain(msgspec.to_builtins(value))
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    """Expose reasoning under every name templates read it by, as transformers 5 does."""
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _tag_final_message(message: dict) -> str:
    """Append the continue tag to the final message's (last) text; returns that text, untagged."""
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content + _CONTINUE_TAG
        return content
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text = part["text"]
                part["text"] = text + _CONTINUE_TAG
                return text
    raise ProtocolError(
        "continue_final_message is set but the final message has no text content to continue.",
        param="messages",
    )


def _cut_at_tag(rendered: str, final_text: str) -> str | None:
    """transformers' cut: everything up to the tag (or None when the template lost the tag or the text)."""
    tag = _CONTINUE_TAG.strip()
    if tag not in rendered or final_text.strip() not in rendered:
        return None
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message, and so the tag's space


def _cut_after_text(rendered: str, final_text: str) -> str:
    """The older rule, for templates that rewrite the tagged text: cut after the last occurrence."""
    for needle in (final_text, final_text.strip()):
        if needle.strip() and needle in rendered:
            return rendered[: rendered.rindex(needle) + len(needle)]
    raise ProtocolError(
        "continue_final_message is set but the final message does not appear in the prompt rendered by the "
        "chat template (the template may rewrite or drop it).",
        param="messages",
    )


def _too_deep() -> ProtocolError:
    return ProtocolError("The request's messages, tools or chat_template_kwargs are nested too deeply.")


def _check_list_of_objects(value: Any, name: str) -> None:
    if value is not None and not (isinstance(value, list) and all(isinstance(item, dict) for item in value)):
        raise ProtocolError(f"'{name}' must be a list of objects.", param=name)


class ChatTemplate:
    """A compiled chat template; `render` turns normalized messages into the prompt string.

    `content_format` says which message shape the template expects (pass it to
    `normalize_messages`). `clock` feeds the template's `strftime_now` (injected: no hidden time).
    """

    def __init__(self, source: str, *, clock: Callable[[], datetime] = datetime.now) -> None:
        if not isinstance(source, str):
            raise ProtocolError("The chat template must be a string.", param="chat_template")
        self.source = source
        self._template, self.content_format = _compile(source)
        self._clock = clock

    def __repr__(self) -> str:
        return f"ChatTemplate(content_format={self.content_format!r}, source={self.source[:40]!r}...)"

    def render(
        self,
        messages: list[dict] | None = None,
        /,
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        bos_token: str | None = None,
        eos_token: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render like HF `apply_chat_template(tokenize=False)`; every failure is a ProtocolError 400.

        `kwargs` are the request's `chat_template_kwargs`: they become template variables and may
        override `bos_token`/`eos_token`; `chat_template` and `tokenize` are refused. So that
        splatting a request's kwargs can never clash with the conversation itself, `messages` is
        positional-only; `render(messages=...)` still works, and a second `messages` is refused.
        """
        if messages is None and "messages" in kwargs:
            messages = kwargs.pop("messages")
        unexpected = sorted(key for key in (*_FORBIDDEN_KWARGS, "messages") if key in kwargs)
        if unexpected:
            raise ProtocolError(
                f"Found unexpected chat template kwargs from request: {unexpected}",
                param="chat_template_kwargs",
            )
        if continue_final_message and add_generation_prompt:
            raise ProtocolError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ProtocolError("'messages' must be a list of objects.", param="messages")
        if not messages:
            raise ProtocolError(
                "Cannot apply the chat template to an empty list of messages.", param="messages"
            )
        _check_list_of_objects(tools, "tools")
        _check_list_of_objects(documents, "documents")
        try:  # private plain copies: the template sees only JSON types, the caller's data stays untouched
            chat = [_alias_reasoning(message) for message in _plain(messages)]
            untagged = _plain(chat) if continue_final_message else chat
            variables = self._variables(
                tools, documents, bool(add_generation_prompt), bos_token, eos_token, kwargs
            )
        except RecursionError:
            raise _too_deep() from None

        if not continue_final_message:
            return self._render(chat, variables)
        final_text = _tag_final_message(chat[-1])
        cut = _cut_at_tag(self._render(chat, variables), final_text)
        if cut is not None:
            return cut
        return _cut_after_text(self._render(untagged, variables), final_text)

    def _variables(
        self,
        tools: list[dict] | None,
        documents: list[dict] | None,
        add_generation_prompt: bool,
        bos_token: str | None,
        eos_token: str | None,
        kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """What HF hands the template besides `messages`: special tokens, overridable by the kwargs."""
        variables: dict[str, Any] = {}
        if bos_token is not None:  # HF leaves a token the tokenizer lacks undefined, not "None"
            variables["bos_token"] = bos_token
        if eos_token is not None:
            variables["eos_token"] = eos_token
        variables.update(_plain(kwargs))
        variables.update(
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            strftime_now=self._strftime_now,
        )
        return variables

    def _strftime_now(self, format: str) -> str:
        return self._clock().strftime(format)

    def _render(self, chat: list[dict], variables: dict[str, Any]) -> str:
        try:
            return self._template.render(messages=chat, **variables)
        except _RaisedByTemplate as exc:
            raise ProtocolError(str(exc.message)) from None
        except jinja2.TemplateError as exc:  # undefined values, sandbox violations, ...
            raise ProtocolError(
                f"Error rendering the chat template: {exc.message or type(exc).__name__}"
            ) from None
        except Exception as exc:
            # the template's own TypeError, ZeroDivisionError, RecursionError, ... on this request's data
            raise ProtocolError(f"Error rendering the chat template: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Message normalization (vLLM's `parse_chat_messages`, text-only models)
# --------------------------------------------------------------------------------------------------

# part type -> the key holding its text
_TEXT_PARTS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
_MEDIA_PARTS = frozenset(MEDIA_PARTS) | PYTHON_ONLY_PARTS
# keys that make a part without `type` a media part (vLLM's shortcut forms)
_MEDIA_KEYS = (
    "image_url",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "audio_url",
    "input_audio",
    "video_url",
)


def _bad(message: str) -> ProtocolError:
    return ProtocolError(message, param="messages")


def _multimodal_error(kind: str, where: str) -> ProtocolError:
    return _bad(f"This model does not support multimodal inputs: {where} is a '{kind}' part.")


def _has_media(part: dict, key: str) -> bool:
    # vLLM accepts `{"image_url": ...}` without `type`; an `input_audio` key counts only when set.
    return part.get(key) is not None if key == "input_audio" else key in part


def _part_type(part: Any, where: str) -> str:
    """The type of one content part (a string is text); a part without `type` is typed by its key."""
    if isinstance(part, str):
        return "text"
    if not isinstance(part, dict):
        raise _bad(f"{where} must be an object or a string, got {type(part).__name__}.")
    part_type = part.get("type")
    if part_type is None:
        media = next((key for key in _MEDIA_KEYS if _has_media(part, key)), None)
        if media is None:
            raise _bad("Missing 'type' field in multimodal part.")  # vLLM's exact words
        return media
    if not isinstance(part_type, str):
        raise _bad(f"Invalid 'type' field in multimodal part ({where}).")
    if part_type not in _MEDIA_PARTS and part_type not in _TEXT_PARTS:
        raise _bad(f"Unknown part type: {part_type!r} ({where}).")
    return part_type


def _part_text(part: Any, part_type: str, where: str) -> str | None:
    """The text of one text part, None for a text part without text, or a 400."""
    if isinstance(part, str):
        return part
    text = part.get(_TEXT_PARTS[part_type])
    if text is not None and not isinstance(text, str):
        raise _bad(f"{where}.{_TEXT_PARTS[part_type]} must be a string.")
    return text


def _normalize_content(
    content: Any, content_format: ContentFormat, where: str, media: MediaCollector | None
) -> str | list[dict]:
    """A message's content as the template expects it; media parts go to `media` (None: a text-only
    model, which refuses them) and leave a placeholder where they were."""
    if content is None:
        content = []
    elif isinstance(content, str):
        if content_format == "string":
            return content
        content = [content]
    elif not isinstance(content, list):
        raise _bad(f"{where}.content must be a string, a list of content parts or null.")
    texts: list[str] = []
    parts: list[dict] = []
    placeholders: list[str] = []
    for index, part in enumerate(content):
        part_where = f"{where}.content[{index}]"
        part_type = _part_type(part, part_where)
        if part_type in _MEDIA_PARTS:
            if media is None:
                raise _multimodal_error(part_type, part_where)
            item = media.add(part, part_type, part_where)
            placeholders.append(media.placeholder(item.kind))
            parts.append({"type": item.kind})
        elif (text := _part_text(part, part_type, part_where)) is not None:
            texts.append(text)
            parts.append({"type": "text", "text": text})
    if content_format == "openai":
        return parts
    return media.join_text(placeholders, texts) if media is not None and placeholders else "\n".join(texts)


def _parse_arguments(arguments: Any, where: str) -> Any:
    """OpenAI sends arguments as a JSON string; templates expect the decoded object (HF convention).

    Absent, null, empty or blank arguments are `{}` (vLLM's rule for the first three; a blank string is
    what a model that called a function without arguments may have streamed). Already decoded objects
    and arrays pass through; anything else that is not a string is the request's error, not `{}`.
    """
    if arguments is None:
        return {}
    if isinstance(arguments, (dict, list)):
        return _plain(arguments) if arguments else {}
    if not isinstance(arguments, str):
        raise _bad(f"{where} must be a JSON string.")
    if not arguments.strip():
        return {}
    try:
        return msgspec.json.decode(arguments)
    except msgspec.DecodeError as exc:
        raise _bad(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_deep() from None


def _normalize_tool_calls(tool_calls: Any, where: str) -> list[dict]:
    """Each call is copied with its arguments decoded; the fields templates print are checked here.

    A call without a string `function.name` (or with an `id` that is not a string) would otherwise
    reach the template and fail there with a message about the template, not about the request.
    """
    if not isinstance(tool_calls, list):
        raise _bad(f"{where} must be a list.")
    normalized = []
    for index, call in enumerate(tool_calls):
        call_where = f"{where}[{index}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise _bad(f"{call_where} must be an object with a 'function' object.")
        name = call["function"].get("name")
        if not isinstance(name, str):
            raise _bad(
                f"{call_where}.function.name must be a string."
                if name is not None
                else f"{call_where}.function has no 'name'."
            )
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise _bad(f"{call_where}.id must be a string.")
        call = _plain(call)
        call["function"]["arguments"] = _parse_arguments(
            call["function"].get("arguments"), f"{call_where}.function.arguments"
        )
        normalized.append(call)
    return normalized


def _normalize_message(
    message: Any, content_format: ContentFormat, where: str, media: MediaCollector | None = None
) -> dict:
    """One message as templates expect it: content normalized; assistant tool calls decoded; a tool
    message's `tool_call_id` kept when it is set (a null one is left out, so `is defined` in a template
    means there is an id to print); `name` kept when it is a string."""
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object.")
    role = message.get("role")
    if not isinstance(role, str):
        raise _bad(f"{where}.role must be a string." if "role" in message else f"{where} has no 'role'.")
    result: dict[str, Any] = {
        "role": role,
        "content": _normalize_content(message.get("content"), content_format, where, media),
    }
    if role == "assistant":
        if message.get("tool_calls") is not None:
            result["tool_calls"] = _normalize_tool_calls(message["tool_calls"], f"{where}.tool_calls")
        reasoning = message.get("reasoning") or message.get("reasoning_content")
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise _bad(f"{where}.reasoning must be a string.")
            result["reasoning"] = result["reasoning_content"] = reasoning
    elif role == "tool" and message.get("tool_call_id") is not None:
        if not isinstance(message["tool_call_id"], str):
            raise _bad(f"{where}.tool_call_id must be a string.")
        result["tool_call_id"] = message["tool_call_id"]
    if isinstance(message.get("name"), str):
        result["name"] = message["name"]
    return result


def normalize_messages(
    messages: list[dict], content_format: str, media: MediaCollector | None = None
) -> list[dict]:
    """Turn request messages into what the template expects; every malformed shape is a 400.

    "string": content is one string (text parts joined with newlines, media placeholders first);
    "openai": a list of `{"type": "text", "text": ...}` and `{"type": "image"}` (audio, video)
    parts. Media parts go to `media`, in order; without one (a text-only model) they are refused.
    """
    if content_format not in ("string", "openai"):
        raise ValueError(f"content_format must be 'string' or 'openai', not {content_format!r}")
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list of message objects.")
    try:
        return [
            _normalize_message(message, content_format, f"messages[{i}]", media)
            for i, message in enumerate(messages)
        ]
    except RecursionError:  # absurdly nested JSON inside a message
        raise _too_deep() from None
