"""Tool parsers: tables of model outputs, each fed in many chunkings, against the non-streaming result.

Each case states (content, [(name, arguments as parsed JSON)]); every chunking must join to the
non-streaming result exactly (ids and raw argument text included) and keep vLLM's delta shapes.
"""

from __future__ import annotations

import json
import keyword
import re
import runpy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.output.deltas import MessageDelta, join
from protocol.output.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    PythonicToolParser,
    ToolParser,
    ToolSpec,
    mistral_call_id,
    tool_parser,
)
from tests.protocol.output.streaming import check_shapes, chunkings, random_chunks, run, summary, whole

Calls = list[tuple[str, dict[str, Any]]]

TRICKY = {
    "q": 'a "quoted" {brace} [bracket] </tool_call> \\ back',
    "nested": {"list": [1, 2.5, {"deep": [True, False, None]}], "empty": {}},
    "unicode": "日本 🎉 é",
    "escaped": "\u00e9\n\t",
}
TRICKY_JSON = json.dumps(TRICKY)
TRICKY_ASCII = json.dumps(TRICKY, ensure_ascii=True).replace("\\u00e9", "\\u00E9")

HERMES: list[tuple[str, str, Calls]] = [
    ("Hello, world!", "Hello, world!", []),
    # a bare call object opening the output, without the tags (Qwen2.5-Coder answers so)
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    (
        ' \n{"name": "f", "arguments": {"a": [1, "}"]}}\n<tool_call>{"name": "g", "arguments": {}}</tool_call>',
        "",
        [("f", {"a": [1, "}"]}), ("g", {})],
    ),
    ('{"answer": 42, "name": "x"}', '{"answer": 42, "name": "x"}', []),
    # ... also in a ```json fence (Qwen2.5-Coder in float32)
    ('```json\n{\n  "name": "f",\n  "arguments": {"city": "Paris"}\n}\n```', "", [("f", {"city": "Paris"})]),
    ('```\n{"name": "f", "arguments": {}}\n``` Done.', " Done.", [("f", {})]),
    ('```json\n{"answer": 1}\n```', '```json\n{"answer": 1}\n```', []),
    ("```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
    ("``not a fence", "``not a fence", []),
    ('{"name": "f", "arguments": 3} and more', '{"name": "f", "arguments": 3} and more', []),
    ("Sure: {\"name\": \"f\", \"arguments\": {}}", "Sure: {\"name\": \"f\", \"arguments\": {}}", []),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"y": [2]}}\n</tool_call>\n',
        "",
        [("a", {"x": 1}), ("b", {"y": [2]})],
    ),
    (
        'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
        "Let me check.\n",
        [("f", {"a": 1})],
    ),
    (f'<tool_call>{{"name": "f", "arguments": {TRICKY_JSON}}}</tool_call>', "", [("f", TRICKY)]),
    (f'<tool_call>{{"name":"f","arguments":{TRICKY_ASCII}}}</tool_call>', "", [("f", TRICKY)]),
    ('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', "", [("now", {})]),
    ('Sure<tool_call>{"name": "f", "arguments": {"a": "b"}}</tool_call>', "Sure", [("f", {"a": "b"})]),
    (
        '<tool_call>{"arguments": {"a": {"b": 1}}, "name": "late"}</tool_call>',
        "",
        [("late", {"a": {"b": 1}})],
    ),
    ('<tool_call>{"name": "s", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("s", {"a": 1})]),
    ('<tool_call>{"name": "bare"}</tool_call>', "", [("bare", {})]),
    ('<tool_call>{"name": "n", "arguments": null}</tool_call>', "", [("n", {})]),
    (
        '<tool_call>{"id": 3, "name": "x", "arguments": {"k": -1e3}, "more": [1, "}"]}</tool_call>',
        "",
        [("x", {"k": -1e3})],
    ),
    ('<tool_call>\n{"name": "eos", "arguments": {"a": 1}}\n', "", [("eos", {"a": 1})]),
    ('<tool_call>{"name": "eos", "arguments": {}}', "", [("eos", {})]),
    (
        'A<tool_call>{"name": "a", "arguments": {}}</tool_call> B <tool_call>{"name": "b", "arguments": {}}</tool_call>\n',
        "A B ",
        [("a", {}), ("b", {})],
    ),
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\nDone.', "\nDone.", [("a", {})]),
    ('<tool_call>{"name": "a", "arguments": {}}\nThen text', "\nThen text", [("a", {})]),
    ("<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", []),
    ('<tool_call>[{"name": "f"}]</tool_call>', '<tool_call>[{"name": "f"}]</tool_call>', []),
    (
        '<tool_call>{"tool": "f", "arguments": {}}</tool_call>',
        '<tool_call>{"tool": "f", "arguments": {}}</tool_call>',
        [],
    ),
    ("a <tool_", "a <tool_", []),
    ("x < y, <tool>, </tool_call>", "x < y, <tool>, </tool_call>", []),
    ("\n", "\n", []),
    ("", "", []),
    ("<tool_call>", "<tool_call>", []),
]

MISTRAL: list[tuple[str, str, Calls]] = [
    ("Hello, world!", "Hello, world!", []),
    (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]',
        "",
        [("a", {"x": 1}), ("b", {})],
    ),
    (
        'Let me look.\n[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]',
        "Let me look.\n",
        [("f", {"a": 1})],
    ),
    (f'[TOOL_CALLS] [{{"name": "f", "arguments": {TRICKY_JSON}}}]', "", [("f", TRICKY)]),
    ('[TOOL_CALLS] {"name": "lone", "arguments": {"a": [1]}}', "", [("lone", {"a": [1]})]),
    ('[TOOL_CALLS] {"name": "f", "arguments": {}}\n\nDone.', "\n\nDone.", [("f", {})]),
    ('[TOOL_CALLS] {"name": "f", "arguments": {}} [TOOL_CALLS]g[ARGS]{}', "", [("f", {}), ("g", {})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [("get_weather", {"city": "Paris"})]),
    ('[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b_2.v-3[ARGS]{}', "", [("a", {"x": 1}), ("b_2.v-3", {})]),
    (f"Checking.[TOOL_CALLS]f[ARGS]{TRICKY_ASCII}", "Checking.", [("f", TRICKY)]),
    ("[TOOL_CALLS]now[ARGS]{}", "", [("now", {})]),
    ('[TOOL_CALLS]f[CALL_ID]a1B2c3D4e[ARGS]{"k": "v"}', "", [("f", {"k": "v"})]),
    ('[TOOL_CALLS]f[ARGS]{"a": 1}\n\nDone.', "\n\nDone.", [("f", {"a": 1})]),
    ("[TOOL_CALLS] this is not a call", "[TOOL_CALLS] this is not a call", []),
    ("[TOOL_CALLS][1, 2]", "[TOOL_CALLS][1, 2]", []),
    ("a [TOOL_", "a [TOOL_", []),
    ("[TOOL_CALLS]", "[TOOL_CALLS]", []),
    ("", "", []),
]

LLAMA3_JSON: list[tuple[str, str, Calls]] = [
    ("The weather is nice.", "The weather is nice.", []),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}', "", [("f", {"a": 1})]),
    (
        '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
        "",
        [("a", {"x": 1}), ("b", {})],
    ),
    (f'{{"name": "f", "parameters": {TRICKY_JSON}}}', "", [("f", TRICKY)]),
    ('{"name": "now", "parameters": {}}', "", [("now", {})]),
    ('{"parameters": {"a": "b"}, "name": "late"}', "", [("late", {"a": "b"})]),
    ('{"name": "alt", "arguments": {"x": [1, 2]}}', "", [("alt", {"x": [1, 2]})]),
    ('\n\n <|python_tag|> {"name": "f", "parameters": {}}\n', "", [("f", {})]),
    ('{"name": "f", "parameters": {}}\nDone.', "\nDone.", [("f", {})]),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ("Use {x} here", "Use {x} here", []),
    ("  <|python", "  <|python", []),
    ("", "", []),
]

PYTHONIC: list[tuple[str, str, Calls]] = [
    ("The answer is 4.", "The answer is 4.", []),
    ('[get_weather(city="Paris", days=3)]', "", [("get_weather", {"city": "Paris", "days": 3})]),
    ("[a(x=1), b(y='two')]", "", [("a", {"x": 1}), ("b", {"y": "two"})]),
    (
        '[f(x=[1, 2], y={"a": None, "b": (True, False)}, z=-1.5, s={1, 2})]',
        "",
        [("f", {"x": [1, 2], "y": {"a": None, "b": [True, False]}, "z": -1.5, "s": [1, 2]})],
    ),
    (
        '[f(s="a), b", t=\'it\\\'s (x\', u="""x"y)]"""), g(q=\'[x]\', r="\\\\")]',
        "",
        [("f", {"s": "a), b", "t": "it's (x", "u": 'x"y)]'}), ("g", {"q": "[x]", "r": "\\"})],
    ),
    ("[now()]", "", [("now", {})]),
    ("<|python_start|>[f(a=1)]<|python_end|>", "", [("f", {"a": 1})]),
    ('[f(city="Zürich", emoji="🎉", empty="")]', "", [("f", {"city": "Zürich", "emoji": "🎉", "empty": ""})]),
    ("[f(a=true, b=null, c=false)]", "", [("f", {"a": True, "b": None, "c": False})]),
    (" [ f ( a = 1 ) , g ( ) ] \n", "", [("f", {"a": 1}), ("g", {})]),
    ("[f(a=1)]\nDone.", "\nDone.", [("f", {"a": 1})]),
    ("[a()]\n? ", "\n? ", [("a", {})]),
    ("[1, 2, 3]", "[1, 2, 3]", []),
    ("[Note] see below", "[Note] see below", []),
    ("[f(1)]", "[f(1)]", []),
    ("[f(a=x)]", "[f(a=x)]", []),
    ("[f(a=1]", "[f(a=1]", []),
    ("[f(a=1)", "", [("f", {"a": 1})]),  # cut short (max_tokens): the complete calls count
    ("[]", "[]", []),
    ("", "", []),
]

CASES = (
    [(HermesToolParser, case) for case in HERMES]
    + [(MistralToolParser, case) for case in MISTRAL]
    + [(Llama3JsonToolParser, case) for case in LLAMA3_JSON]
    + [(PythonicToolParser, case) for case in PYTHONIC]
)


def expected_id(cls: type[ToolParser], index: int) -> str:
    call_id = f"chatcmpl-tool-{index}"
    return mistral_call_id(call_id) if cls is MistralToolParser else call_id


@pytest.mark.parametrize(("cls", "case"), CASES, ids=lambda value: repr(value)[:50])
def test_every_chunking_gives_the_table_result(cls: type[ToolParser], case: tuple[str, str, Calls]) -> None:
    output, content, calls = case
    reference = whole(cls, output)
    assert summary(reference) == (content, "", calls)
    assert [call.id for call in reference[2]] == [expected_id(cls, index) for index in range(len(calls))]
    for chunks in chunkings(output):
        parser = cls()
        deltas = run(parser, chunks)
        assert join(deltas) == reference, chunks
        check_shapes(deltas)
        assert parser.called == bool(calls)


def test_hermes_bare_object_is_a_call_only_when_it_names_an_offered_tool() -> None:
    tools = [ToolSpec("get_weather", {"type": "object"})]
    text = '{"name": "get_time", "arguments": {}}'
    for chunks in chunkings(text):
        assert summary(join(run(HermesToolParser(tools), chunks))) == (text, "", [])
    call = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    for chunks in chunkings(call):
        assert summary(join(run(HermesToolParser(tools), chunks))) == ("", "", [("get_weather", {"city": "Rome"})])


def test_hermes_streams_arguments_as_they_arrive() -> None:
    parser = HermesToolParser()
    head = '<tool_call>\n{"name": "f", "arguments": '
    (first,) = parser.feed(head).tool_calls  # the name is known, the arguments have not begun
    assert (first.name, first.arguments) == ("f", "")
    deltas = [parser.feed(char) for char in '{"city": "Paris", "days": 3}}\n</tool_call>']
    released = [call for delta in deltas for call in delta.tool_calls]
    assert released[0].arguments == "{" and released[0].name is None
    assert len(released) > 10  # character by character, not at the end
    assert "".join(call.arguments for call in released) == '{"city": "Paris", "days": 3}'
    assert parser.called


def test_hermes_releases_a_call_once_its_name_is_known() -> None:
    parser = HermesToolParser()
    assert parser.feed('<tool_call>{"name": "f').tool_calls == ()
    first = parser.feed('",').tool_calls
    assert first and first[0].id == "chatcmpl-tool-0" and first[0].name == "f" and first[0].arguments == ""


def test_hermes_holds_only_a_possible_marker() -> None:
    parser = HermesToolParser()
    assert parser.feed("Hi <tool").content == "Hi "
    assert parser.feed("box>").content == "<toolbox>"
    assert parser.feed(" <").content == " "
    assert parser.finish().content == "<"


def test_hermes_arguments_before_name_are_released_with_the_name() -> None:
    parser = HermesToolParser()
    assert not parser.feed('<tool_call>{"arguments": {"a": 1}, ').tool_calls
    (call,) = parser.feed('"name": "f"').tool_calls
    assert (call.name, call.arguments) == ("f", '{"a": 1}')


def test_hermes_invalid_json_whole_is_content() -> None:
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>'  # a brace short
    assert whole(HermesToolParser, text) == ("Hi " + text[3:], "", [])
    text = '<tool_call>{"name": "f", "arguments": {"a": 1},}</tool_call>'  # trailing comma
    assert whole(HermesToolParser, text) == (text, "", [])


def test_hermes_invalid_json_streamed_after_the_name_stays_a_call() -> None:
    """Documented limit: what was released cannot be taken back; the broken rest is dropped."""
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>after'
    parser = HermesToolParser()
    deltas = run(parser, list(text))
    content, _, calls = join(deltas)
    assert [(call.name, call.arguments) for call in calls] == [("f", '{"a": 1}')]
    assert content == "after"
    check_shapes(deltas, complete=False)


def test_truncated_call_keeps_what_was_released() -> None:
    """max_tokens inside a call: the released part stays (finish_reason says length)."""
    for cls, text in [
        (HermesToolParser, '<tool_call>{"name": "f", "arguments": {"a": [1, 2'),
        (MistralToolParser, '[TOOL_CALLS]f[ARGS]{"a": [1, 2'),
        (Llama3JsonToolParser, '{"name": "f", "parameters": {"a": [1, 2'),
    ]:
        parser = cls()
        deltas = run(parser, list(text))
        _, _, calls = join(deltas)
        assert [(call.name, call.arguments) for call in calls] == [("f", '{"a": [1, 2')]
        assert parser.called
        check_shapes(deltas, complete=False)
        assert whole(cls, text) == join(deltas)


def test_pythonic_whole_list_with_a_bad_call_is_content() -> None:
    text = "[f(a=1), g(2)]"
    assert whole(PythonicToolParser, text) == (text, "", [])
    streamed = join(run(PythonicToolParser(), list(text)))  # f went out before g was seen
    assert [(call.name, call.arguments) for call in streamed[2]] == [("f", '{"a": 1}')]
    assert streamed[0] == ""


def test_pythonic_releases_each_call_at_its_parenthesis() -> None:
    parser = PythonicToolParser()
    assert not parser.feed('[f(a="x)"').tool_calls
    (call,) = parser.feed(")").tool_calls
    assert (call.id, call.name, call.arguments) == ("chatcmpl-tool-0", "f", '{"a": "x)"}')
    assert not parser.feed(", g(b=[1,").tool_calls
    (call,) = parser.feed(" 2])]").tool_calls
    assert (call.index, call.name, call.arguments) == (1, "g", '{"b": [1, 2]}')


def test_ids_come_from_the_factory() -> None:
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    parser = HermesToolParser(new_id=lambda index: f"call_{index}_x")
    assert [call.id for call in join(run(parser, [text]))[2]] == ["call_0_x", "call_1_x"]
    ids = [mistral_call_id(f"id{index}") for index in range(50)]
    assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", call_id) for call_id in ids)
    assert len(set(ids)) == 50 and mistral_call_id("id0") == ids[0]
    parser = MistralToolParser([ToolSpec("a")], new_id=lambda index: f"req-7-{index}")
    (call,) = join(run(parser, ["[TOOL_CALLS]a[ARGS]{}"]))[2]
    assert call.id == mistral_call_id("req-7-0")


def test_special_tokens_are_kept_for_formats_whose_markers_are_special() -> None:
    assert HermesToolParser.skip_special_tokens is False
    assert MistralToolParser.skip_special_tokens is False
    assert Llama3JsonToolParser.skip_special_tokens is True
    assert PythonicToolParser.skip_special_tokens is True


# Generated calls, rendered in each format: every chunking must give them back.

_KEY = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda key: not keyword.iskeyword(key))
_TEXT = st.text(
    alphabet=st.sampled_from(list("ab \"'\\{}[](),;:<>/\n\té🎉日") + ["\x00", "\u2028"]), max_size=12
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_CALLS = st.lists(st.tuples(_KEY, st.dictionaries(_KEY, _JSON, max_size=4)), min_size=1, max_size=3)
_PROSE = st.text(alphabet=st.sampled_from(list("ab .,!?\n<>[]{}é")), max_size=10)


_TAIL = st.text(alphabet=st.sampled_from(list("ab .,!?\né")), max_size=6)


def _render(name: str, calls: Calls, prose: str, ascii_only: bool) -> tuple[str, str]:
    """(output, expected content) for `calls` in format `name`, with `prose` before them if the
    format allows it."""
    dump = lambda value: json.dumps(value, ensure_ascii=ascii_only)  # noqa: E731
    before = prose if prose.strip() else ""
    if name == "hermes":
        blocks = [f"<tool_call>\n{dump({'name': f, 'arguments': a})}\n</tool_call>" for f, a in calls]
        return prose + "\n".join(blocks), before
    if name == "mistral_v3":
        return prose + "[TOOL_CALLS] " + dump([{"name": f, "arguments": a} for f, a in calls]), before
    if name == "mistral_lone":
        (f, a) = calls[0]
        return prose + "[TOOL_CALLS] " + dump({"name": f, "arguments": a}), before
    if name == "mistral":
        return prose + "".join(f"[TOOL_CALLS]{f}[ARGS]{dump(a)}" for f, a in calls), before
    if name == "llama3_json":
        return "; ".join(dump({"name": f, "parameters": a}) for f, a in calls), ""
    rendered = ", ".join(f"{f}({', '.join(f'{k}={v!r}' for k, v in a.items())})" for f, a in calls)
    return f"[{rendered}]", ""


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(["hermes", "mistral", "mistral_v3", "mistral_lone", "llama3_json", "pythonic"]),
    calls=_CALLS,
    prose=_PROSE,
    tail=_TAIL,
    ascii_only=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_generated_calls_stream_as_they_parse_whole(
    name: str, calls: Calls, prose: str, tail: str, ascii_only: bool, seed: int
) -> None:
    output, content = _render(name, calls, prose, ascii_only)
    output += "\n" + tail  # text after the calls is content, unless it is only whitespace
    content += "\n" + tail if tail.strip() else ""
    if name == "mistral_lone":
        calls = calls[:1]
    cls = tool_parser(name.partition("_")[0] if name.startswith("mistral") else name)
    reference = whole(cls, output)
    assert summary(reference) == (content, "", [(f, json.loads(json.dumps(a))) for f, a in calls])
    for chunks in (list(output), random_chunks(output, seed, longest=5)):
        deltas = run(cls(), chunks)
        assert join(deltas) == reference
        check_shapes(deltas)


_FRAGMENTS = [
    "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<|python_tag|>", "<|python_start|>",
    '{"name": "f"', ', "arguments": ', '"parameters": ', "{", "}", "[", "]", "(", ")", "f(", "a=1", '"', "'",
    "\\", ",", ";", ":", " ", "\n", "x", "é", "null", "1",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    name=st.sampled_from(sorted(TOOL_PARSERS)),
    pieces=st.lists(st.sampled_from(_FRAGMENTS), max_size=25),
    seed=st.integers(0, 10**6),
)
def test_any_text_is_handled(name: str, pieces: list[str], seed: int) -> None:
    """Arbitrary text never raises, keeps the delta shapes, and streams as it parses whole when
    the whole output has no call (a call released early cannot be withdrawn, so not the converse)."""
    cls = tool_parser(name)
    text = "".join(pieces)
    reference = whole(cls, text)
    for chunks in (list(text), random_chunks(text, seed, longest=6)):
        deltas: list[MessageDelta] = run(cls(), chunks)
        check_shapes(deltas, complete=False)
        if not reference[2] and not join(deltas)[2]:
            assert join(deltas) == reference


def test_registry_names_the_built_ins() -> None:
    assert tool_parser("hermes") is HermesToolParser
    assert tool_parser("mistral") is MistralToolParser
    assert tool_parser("llama3_json") is Llama3JsonToolParser
    assert tool_parser("pythonic") is PythonicToolParser
    with pytest.raises(
        KeyError, match="unknown tool parser 'nope'; known: hermes, llama3_json, mistral, pythonic"
    ):
        tool_parser("nope")


def test_a_plugin_file_registers_its_parser(tmp_path: Path) -> None:
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from protocol.output.deltas import MessageDelta, ToolCallDelta\n"
        "from protocol.output.tool_parsers import ToolParser, register_tool_parser\n"
        "\n"
        "@register_tool_parser('my_parser')\n"
        "class MyParser(ToolParser):\n"
        "    def feed(self, text):\n"
        "        return MessageDelta(tool_calls=(ToolCallDelta(0, self.new_id(0), 'echo', text),))\n"
    )
    try:
        runpy.run_path(str(plugin))  # what `--tool-parser-plugin FILE` does
        cls = tool_parser("my_parser")
        assert cls.__name__ == "MyParser" and cls.name == "my_parser"
        (call,) = cls().feed("{}").tool_calls
        assert (call.id, call.name, call.arguments) == ("chatcmpl-tool-0", "echo", "{}")
        with pytest.raises(KeyError, match="my_parser"):
            tool_parser("not_my_parser")
    finally:
        TOOL_PARSERS.pop("my_parser", None)
