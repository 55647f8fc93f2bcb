"""Reasoning parsers: tables of outputs, each fed in many chunkings, against the non-streaming result."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.output.deltas import join
from protocol.output.reasoning import (
    REASONING_PARSERS,
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParser,
    reasoning_parser,
    register_reasoning_parser,
)
from tests.protocol.output.streaming import chunkings, random_chunks, run, whole

# (output, reasoning, content)
DEEPSEEK_R1 = [
    ("I think.</think>Answer.", "I think.", "Answer."),
    ("<think>I think.</think>\n\nAnswer.", "I think.", "\n\nAnswer."),
    ("Still thinking <thi", "Still thinking <thi", ""),
    ("never closed, no tag at all", "never closed, no tag at all", ""),
    ("</think>", "", ""),
    ("", "", ""),
    ("<thin", "<thin", ""),
    ("a < b </thinking> c</think>d", "a < b </thinking> c", "d"),
    ("Hmm<think>x</think>y", "Hmm<think>x", "y"),
    ("a</think>b</think>c", "a", "b</think>c"),
    ("思考 🤔 \\n</think>答え é", "思考 🤔 \\n", "答え é"),
    ("<think></think>", "", ""),
]

QWEN3 = [
    ("<think>\nLet me see.\n</think>\n\nParis.", "\nLet me see.\n", "\n\nParis."),
    ("Paris.", "", "Paris."),
    ("\n<think>x</think>y", "x", "y"),
    ("<think>never closed", "never closed", ""),
    ("<think>never closed </thi", "never closed </thi", ""),
    ("<thinking>x", "", "<thinking>x"),
    ("<think></think>Answer", "", "Answer"),
    ("  ", "", "  "),
    ("", "", ""),
    ("<thi", "", "<thi"),
    ("<think>a</think>b<think>c</think>", "a", "b<think>c</think>"),
    ("  <t>x</think>", "", "  <t>x</think>"),
    ("<think>日本語 🎉</think>答え", "日本語 🎉", "答え"),
]

CASES = [(DeepSeekR1ReasoningParser, case) for case in DEEPSEEK_R1] + [
    (Qwen3ReasoningParser, case) for case in QWEN3
]


@pytest.mark.parametrize(("cls", "case"), CASES, ids=lambda value: repr(value)[:40])
def test_every_chunking_gives_the_table_result(
    cls: type[ReasoningParser], case: tuple[str, str, str]
) -> None:
    output, reasoning, content = case
    expected = (content, reasoning, [])
    assert whole(cls, output) == expected
    for chunks in chunkings(output):
        deltas = run(cls(), chunks)
        assert join(deltas) == expected, chunks
        assert all(not delta.tool_calls for delta in deltas)


@pytest.mark.parametrize(
    ("cls", "text", "ended_after"),
    [
        (DeepSeekR1ReasoningParser, "<think>abc</think>de", 18),
        (DeepSeekR1ReasoningParser, "abc</think>", 11),
        (Qwen3ReasoningParser, "<think>abc</think>de", 18),
        (Qwen3ReasoningParser, "Paris", 1),
        (Qwen3ReasoningParser, "  <tx", 5),
    ],
)
def test_reasoning_ends_at_the_closing_tag(cls: type[ReasoningParser], text: str, ended_after: int) -> None:
    parser = cls()
    for count, char in enumerate(text, 1):
        parser.feed(char)
        assert parser.reasoning_ended == (count >= ended_after), (text[:count], parser.reasoning_ended)


def test_deepseek_never_closed_is_still_reasoning_at_the_end() -> None:
    parser = DeepSeekR1ReasoningParser()
    parser.feed("thinking")
    parser.finish()
    assert not parser.reasoning_ended


def test_a_partial_tag_is_held_and_released_when_it_is_not_one() -> None:
    parser = DeepSeekR1ReasoningParser()
    assert parser.feed("a</thi").reasoning == "a"
    assert parser.feed("s").reasoning == "</this"
    parser = Qwen3ReasoningParser()
    assert not parser.feed("\n<th")
    assert parser.feed("e").content == "\n<the"


FRAGMENTS = ["<think>", "</think>", "<", "</", "think", ">", "a", " ", "\n", "é", "🎉"]


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(REASONING_PARSERS)),
    pieces=st.lists(st.sampled_from(FRAGMENTS), max_size=20),
    seed=st.integers(0, 1000),
)
def test_any_text_streams_as_it_parses_whole(name: str, pieces: list[str], seed: int) -> None:
    cls = reasoning_parser(name)
    text = "".join(pieces)
    expected = whole(cls, text)
    assert join(run(cls(), random_chunks(text, seed, longest=4))) == expected
    assert join(run(cls(), list(text))) == expected
    content, reasoning, _ = expected
    assert len(content) + len(reasoning) <= len(text)


def test_registry() -> None:
    assert reasoning_parser("deepseek_r1") is DeepSeekR1ReasoningParser
    assert reasoning_parser("qwen3") is Qwen3ReasoningParser
    with pytest.raises(KeyError, match="deepseek_r1.*qwen3"):
        reasoning_parser("nope")

    @register_reasoning_parser("test_plugin_reasoning")
    class Plugin(ReasoningParser):
        pass

    try:
        assert reasoning_parser("test_plugin_reasoning") is Plugin
        assert Plugin.name == "test_plugin_reasoning"
    finally:
        del REASONING_PARSERS["test_plugin_reasoning"]
