"""A constraint compiled into a guide, and the per-sequence matchers that walk it.

Two backends, both through outlines' stack:
- JSON schema, regex, choice and json_object compile with outlines-core into an `Index` (a DFA over
  token ids, shared by every sequence that uses the constraint); a sequence's state is a `Guide`.
- Lark and EBNF grammars go to llguidance, the library outlines' own grammar support runs on
  (`outlines.backends.llguidance`). We call it directly because outlines' wrapper is a whole-batch
  HF logits processor tied to a model object, while we need one matcher per sequence that can
  fork, roll back a rejected draft and write its mask into our batched bitmask.

Masks are bitmasks of 32-bit words, one bit per token id, as both libraries write them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.structured.vocabulary import ConstraintVocabulary
from protocol.engine_api import StructuredOutput

# how many accepted tokens a matcher can take back (speculative drafts are at most this long)
MAX_ROLLBACK = 32


class ConstraintError(ValueError):
    """The constraint cannot be compiled; the message says why (the client gets it in a 400)."""


def words(vocab_size: int) -> int:
    """32-bit words in one row of a bitmask over `vocab_size` tokens."""
    return (vocab_size + 31) // 32


class Matcher:
    """One sequence's position in a guide."""

    def fill(self, row: torch.Tensor) -> None:
        """Write the bitmask of the tokens allowed next into `row` (int32, contiguous)."""
        raise NotImplementedError

    def advance(self, token_id: int) -> bool:
        """Take `token_id`; False (and no move) when the guide does not allow it."""
        raise NotImplementedError

    def rollback(self, count: int) -> None:
        """Take back the last `count` tokens (a rejected draft)."""
        raise NotImplementedError

    def copy(self) -> Matcher:
        raise NotImplementedError


class CompiledGuide:
    """What a constraint compiles to; `matcher()` starts a sequence at its beginning."""

    def matcher(self) -> Matcher:
        raise NotImplementedError


# ---- outlines-core ----


class _OutlinesMatcher(Matcher):
    def __init__(self, index: Any, history: Sequence[int] = ()) -> None:
        self._index = index
        self._replay(history)

    def _replay(self, history: Sequence[int]) -> None:
        """Start over at the guide's beginning and take `history` again."""
        from outlines_core import Guide

        self._guide = Guide(self._index, max_rollback=MAX_ROLLBACK)
        self._history: list[int] = []
        for token_id in history:
            self.advance(token_id)

    def fill(self, row: torch.Tensor) -> None:
        self._guide.write_mask_into(row.data_ptr(), row.numel(), 4)

    def advance(self, token_id: int) -> bool:
        if not self._guide.accepts_tokens([token_id]):
            return False
        self._guide.advance(token_id, return_tokens=False)
        self._history.append(token_id)
        return True

    def rollback(self, count: int) -> None:
        if not count:
            return
        if count <= self._guide.get_allowed_rollback():
            self._guide.rollback_state(count)
            del self._history[-count:]
        else:  # a draft longer than the guide keeps states for (it raises): replay what is kept
            self._replay(self._history[:-count])

    def copy(self) -> Matcher:
        return _OutlinesMatcher(self._index, self._history)


@dataclass(frozen=True)
class OutlinesGuide(CompiledGuide):
    index: Any  # outlines_core.Index

    def matcher(self) -> Matcher:
        return _OutlinesMatcher(self.index)


# ---- llguidance (grammars) ----


class _GrammarMatcher(Matcher):
    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill(self, row: torch.Tensor) -> None:
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def advance(self, token_id: int) -> bool:
        # checked first: consuming a refused token puts an LLMatcher in an error state it never
        # leaves (not even by rollback), and a speculative draft may well hold one
        if self._matcher.is_stopped() or self._matcher.validate_tokens([token_id]) != 1:
            return False
        return bool(self._matcher.consume_token(token_id)) and not self._matcher.is_error()

    def rollback(self, count: int) -> None:
        if count:
            self._matcher.rollback(count)

    def copy(self) -> Matcher:
        return _GrammarMatcher(self._matcher.deep_copy())


@dataclass(frozen=True)
class GrammarGuide(CompiledGuide):
    tokenizer: Any  # llguidance.LLTokenizer
    grammar: str  # llguidance's serialized grammar

    def matcher(self) -> Matcher:
        import llguidance

        return _GrammarMatcher(llguidance.LLMatcher(self.tokenizer, self.grammar))


# ---- compiling ----


def constraint_regex(constraint: StructuredOutput) -> str | None:
    """The regex outlines-core compiles for a JSON schema, regex, choice or json_object; None for a grammar."""
    from outlines_core.json_schema import build_regex_from_schema

    whitespace = constraint.whitespace_pattern
    if constraint.disable_any_whitespace:
        whitespace = ""
    if constraint.regex is not None:
        return constraint.regex
    if constraint.choice is not None:
        return "|".join(_escape(choice) for choice in constraint.choice)
    if constraint.json is not None or constraint.json_object:
        schema = constraint.json if constraint.json is not None else '{"type": "object"}'
        if constraint.disable_additional_properties:
            try:
                schema = json.dumps(_no_additional_properties(json.loads(schema)))
            except ValueError as error:
                raise ConstraintError(f"The JSON schema is not valid JSON: {_first_line(error)}") from None
        try:
            return build_regex_from_schema(schema, whitespace)
        except (ValueError, TypeError, RecursionError) as error:
            raise ConstraintError(f"The JSON schema is not supported: {_first_line(error)}") from None
    return None


def uses_outlines_core(constraint: StructuredOutput) -> bool:
    """Which backend compiles `constraint`.

    Regexes and choices: outlines-core (a DFA over the vocabulary, built in tens of milliseconds
    for them; the cheapest mask per step). JSON schemas and json_object: llguidance, unless the
    request asked for `guided_decoding_backend: "outlines"`. Measured on SmolLM2's 49k tokens
    (bench/RESULTS.md): outlines-core took 0.4 s for a typical schema, 3.5 s for 20 bounded strings
    and 6-7 s for json_object, and silently ignores numeric bounds (minimum, maximum, multipleOf);
    llguidance compiles any of them in ~2 ms, enforces the bounds, and masks in 10-250 us per token.
    On a 2-core machine a seconds-long compile takes CPU the decode threads need (3.7x their
    inter-token latency meanwhile, measured), so the fast compile is the default.
    """
    if constraint.grammar is not None:
        return False
    if constraint.regex is not None or constraint.choice is not None:
        return True
    return constraint.backend == "outlines"


def compile_constraint(constraint: StructuredOutput, vocabulary: ConstraintVocabulary, tokenizer: Any) -> CompiledGuide:
    """Compile (seconds for a big schema over a big vocabulary with outlines-core; run it off the engine thread)."""
    if constraint.grammar is not None:
        return _compile_grammar(constraint.grammar, vocabulary, tokenizer)
    if not uses_outlines_core(constraint):
        return _compile_json(constraint, vocabulary, tokenizer)
    regex = constraint_regex(constraint)
    assert regex is not None
    from outlines_core import Index

    try:
        return OutlinesGuide(Index(regex, vocabulary.outlines()))
    except (ValueError, TypeError) as error:
        what = "regex" if constraint.regex is not None else "constraint"
        message = _first_line(error)
        if "building NFA" in message or "DFA" in message:
            # outlines-core says no more than that: name the problem where Python's parser can
            message = _regex_problem(regex) or (
                message + " (outlines-core regexes have no look-around and no back-references)"
            )
        raise ConstraintError(f"The {what} cannot be compiled: {message}") from None


# a back-reference or a look-around, not escaped (an even run of backslashes before it)
_UNSUPPORTED_REGEX = re.compile(r"(?<!\\)(?:\\\\)*(\\[1-9]|\\k<|\(\?(?:[=!]|<[=!]|P=))")


def _regex_problem(regex: str) -> str | None:
    """Why a regex outlines-core refused is wrong, as far as Python's `re` (a close dialect) tells."""
    try:
        re.compile(regex)
    except re.error as error:
        return f"{error.msg} at position {error.pos}" if error.pos is not None else error.msg
    except (OverflowError, RecursionError, ValueError) as error:
        return _first_line(error)
    found = _UNSUPPORTED_REGEX.search(regex)
    if found is not None:
        what, where = found.group(1), found.start(1)
        return f"{what!r} at position {where}: look-around and back-references are not supported"
    return None


_LLG_TOKENIZERS: dict[str, Any] = {}


def _llg_tokenizer(vocabulary: ConstraintVocabulary, tokenizer: Any) -> Any:
    cached = _LLG_TOKENIZERS.get(vocabulary.fingerprint)
    if cached is None:
        import llguidance.hf

        cached = llguidance.hf.from_tokenizer(
            tokenizer.hf, n_vocab=vocabulary.vocab_size, eos_token=sorted(vocabulary.eos_token_ids)
        )
        _LLG_TOKENIZERS[vocabulary.fingerprint] = cached
    return cached


def _compile_grammar(text: str, vocabulary: ConstraintVocabulary, tokenizer: Any) -> CompiledGuide:
    import llguidance

    kind = "gbnf" if "::=" in text else "lark"
    try:
        grammar = llguidance.grammar_from(kind, text)
    except (ValueError, RuntimeError) as error:
        raise ConstraintError(f"The grammar cannot be parsed as {kind.upper()}: {_first_line(error)}") from None
    llg_tokenizer = _llg_tokenizer(vocabulary, tokenizer)
    message = llguidance.LLMatcher.validate_grammar(grammar, llg_tokenizer)
    if message:
        raise ConstraintError(f"The grammar cannot be compiled: {_first_line(message)}")
    return GrammarGuide(llg_tokenizer, grammar)


def _compile_json(constraint: StructuredOutput, vocabulary: ConstraintVocabulary, tokenizer: Any) -> CompiledGuide:
    """A JSON schema (or any object) with llguidance, read the way outlines-core reads it, so the
    backend does not change what a schema allows: whitespace is one optional space between items
    (a small model cannot wander into endless newlines), and an object that lists its properties
    has no others unless it says `additionalProperties` (as OpenAI's strict schemas require)."""
    import llguidance

    schema_text = constraint.json if constraint.json is not None else '{"type": "object"}'
    try:
        schema = json.loads(schema_text)
    except ValueError as error:
        raise ConstraintError(f"The JSON schema is not valid JSON: {_first_line(error)}") from None
    schema = _no_additional_properties(schema, listed_only=not constraint.disable_additional_properties)
    options: dict[str, Any] = {"whitespace_flexible": False}
    if not constraint.disable_any_whitespace:
        options = {"whitespace_pattern": constraint.whitespace_pattern or r"[ ]?"}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except (ValueError, TypeError, RecursionError) as error:
        raise ConstraintError(f"The JSON schema is not valid: {_first_line(error)}") from None
    llg_tokenizer = _llg_tokenizer(vocabulary, tokenizer)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llg_tokenizer)
    if failed:
        raise ConstraintError(f"The JSON schema is not supported: {_compact(messages[0])}")
    return GrammarGuide(llg_tokenizer, grammar)


def _escape(text: str) -> str:
    """A literal for outlines-core's regex syntax (Rust `regex`): escape every meta character."""
    return "".join("\\" + char if char in r"\.+*?()|[]{}^$#&-~" else char for char in text)


# where a JSON schema holds subschemas: one, a list of them, or a mapping of names to them; the other
# keywords hold values (enum, const, default, examples) that must stay as they are
_SUBSCHEMA = (
    *("additionalItems", "additionalProperties", "contains", "else", "if", "items", "not"),
    *("propertyNames", "then", "unevaluatedItems", "unevaluatedProperties"),
)
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("$defs", "definitions", "dependentSchemas", "patternProperties", "properties")


def _no_additional_properties(schema: Any, *, listed_only: bool = False) -> Any:
    """`additionalProperties: false` on every object schema that does not set it (subschemas only).

    `listed_only`: only on objects that list their `properties` (a bare `{"type": "object"}` stays
    any object), which is how outlines-core reads a schema."""
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            result[key] = {
                name: _no_additional_properties(sub, listed_only=listed_only) for name, sub in value.items()
            }
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            result[key] = [_no_additional_properties(sub, listed_only=listed_only) for sub in value]
        elif key in _SUBSCHEMA:
            result[key] = _no_additional_properties(value, listed_only=listed_only)
    if "properties" in result or (result.get("type") == "object" and not listed_only):
        result.setdefault("additionalProperties", False)
    return result


def _compact(message: str, limit: int = 400) -> str:
    """A multi-line library message on one line (llguidance puts the reason after a header line)."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip() and set(line.strip()) != {"^"})
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
