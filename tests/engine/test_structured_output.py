"""Structured output as a user of the engine sees it, on SmolLM2-135M-Instruct.

What it proves:
- every finished output of a JSON schema, regex, choice, json_object, Lark or GBNF constraint is
  valid (jsonschema / re.fullmatch / membership / json.loads / the grammar's pattern), greedy and
  sampled at temperature 1; an output cut by max_tokens is a prefix the guide accepts;
- the constraint holds for every sequence of a request: n samples, best_of candidates and beams
  (forked matchers);
- with n-gram speculative decoding, drafts are masked and rolled back: outputs stay valid and greedy
  output is token for token the output without speculation (a grammar whose drafts the guide
  refuses included: llguidance's matcher once broke for good on a refused draft token);
- a constraint that cannot compile fails its request with a 400 naming the problem, and the failure
  is cached (a second request fails in the same step, without compiling);
- while a guide compiles, other requests keep stepping and the waiting one counts as waiting; it
  starts once the guide is ready; an Abort of a waiting request leaves nothing behind;
- a compiled guide is reused by the next request with the same constraint;
- the mask lets a finished guide end with any of the model's EOS ids (GrammarMask unit tests), and
  the matchers survive refused tokens and long rollbacks.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import jsonschema
import pytest
import torch

from engine.engine import Engine, EngineConfig
from engine.loader import LoadedModel, load_model
from engine.model_files import DEFAULT_MODEL, resolve_model
from engine.processors.base import Admission, RowRef
from engine.processors.grammar import GrammarMask
from engine.structured.guides import MAX_ROLLBACK, Matcher, _no_additional_properties
from protocol.engine_api import Abort, Failed, Generate, SamplingParams, StructuredOutput, Tokens

SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
}
PHONE = r"\d{3}-\d{4}"
DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
META_CHOICES = ("a+b", "(x)", "1.5", "[z]", "$^|*")
LARK = 'start: "hello" " " NAME\nNAME: /[a-z]{1,8}/'
LARK_PATTERN = r"hello [a-z]{1,8}"
GBNF = 'root ::= answer " " num\nanswer ::= "yes" | "no"\nnum ::= [0-9] | [0-9] [0-9]'
GBNF_PATTERN = r"(yes|no) [0-9]{1,2}"


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/engine/test_smollm2_batching.py (2 shared cores)
    yield load_model(resolve_model(DEFAULT_MODEL), dtype="float32", progress=False)
    torch.set_num_threads(threads)


def make_engine(loaded: LoadedModel, **config) -> Engine:
    return Engine(
        EngineConfig(
            model=DEFAULT_MODEL,
            dtype="float32",
            progress=False,
            max_model_len=512,
            kv_cache_memory="64MiB",
            **config,
        ),
        loaded=loaded,
    )


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Engine:
    engine = make_engine(loaded)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def spec_engine(loaded: LoadedModel) -> Engine:
    engine = make_engine(loaded, speculative_config=SPEC)
    yield engine
    engine.shutdown()


# ---- helpers ----


@dataclass
class Output:
    token_ids: list[int]
    text: str
    finish_reason: str | None


def chat(engine: Engine, text: str) -> tuple[int, ...]:
    return tuple(engine.tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"))


def request(engine: Engine, rid: str, prompt: str, constraint: StructuredOutput, **params) -> Generate:
    params.setdefault("max_tokens", 48)
    return Generate(rid, chat(engine, prompt), SamplingParams(structured=constraint, **params))


def collect(engine: Engine, events: Iterable) -> dict[tuple[str, int], Output]:
    tokens: dict[tuple[str, int], list[int]] = defaultdict(list)
    finish: dict[tuple[str, int], str | None] = {}
    for event in events:
        assert isinstance(event, Tokens), event
        tokens[event.request_id, event.index].extend(event.token_ids)
        if event.finish_reason:
            finish[event.request_id, event.index] = event.finish_reason
    return {key: Output(ids, engine.tokenizer.decode(ids), finish.get(key)) for key, ids in tokens.items()}


def generate(engine: Engine, commands: Sequence[Generate]) -> dict[tuple[str, int], Output]:
    return collect(engine, engine.generate_sync(commands))


def sampled(engine: Engine, prompt: str, constraint: StructuredOutput, seeds=(1, 2, 3), **params):
    """Greedy and one temperature-1 request per seed, in one batch."""
    commands = [request(engine, "greedy", prompt, constraint, temperature=0.0, **params)]
    commands += [
        request(engine, f"seed{seed}", prompt, constraint, temperature=1.0, seed=seed, **params)
        for seed in seeds
    ]
    return generate(engine, commands)


def guide_accepts(engine: Engine, constraint: StructuredOutput, token_ids: Sequence[int]) -> bool:
    """Whether the guide takes every token (an output cut by max_tokens is a valid prefix)."""
    matcher = engine.core.guides.ready(constraint).matcher()
    eos = engine.tokenizer.eos_token_ids
    return all(matcher.advance(token) for token in token_ids if token not in eos)


# ---- what comes out ----


def test_json_schema_outputs_validate(engine):
    constraint = StructuredOutput(json=json.dumps(PERSON))
    outputs = sampled(engine, "Describe a person as JSON.", constraint, max_tokens=120)
    assert outputs["greedy", 0].finish_reason == "stop"
    stopped = 0
    for output in outputs.values():
        if output.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(output.text), PERSON)
        else:
            assert guide_accepts(engine, constraint, output.token_ids), output.text
    assert stopped >= 2


def test_json_schema_options_shape_the_output(engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}}
    constraint = StructuredOutput(
        json=json.dumps(schema), disable_any_whitespace=True, disable_additional_properties=True
    )
    outputs = sampled(engine, "Give me JSON.", constraint, seeds=(1, 2))
    for output in outputs.values():
        assert output.finish_reason == "stop", output
        value = json.loads(output.text)
        jsonschema.validate(value, {**schema, "additionalProperties": False})
        assert output.text == json.dumps(value, separators=(",", ":"))  # not a space anywhere


def test_disable_additional_properties_closes_subschemas_and_leaves_values_alone():
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object"}, "c": {"const": {"type": "object"}}},
        "anyOf": [{"properties": {"x": {"type": "integer"}}}],
        "enum": [{"properties": {}}],
    }
    assert _no_additional_properties(schema) == {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "additionalProperties": False},  # a property so named
            "c": {"const": {"type": "object"}},  # a value, not a schema: as it was
        },
        "anyOf": [{"properties": {"x": {"type": "integer"}}, "additionalProperties": False}],
        "enum": [{"properties": {}}],
        "additionalProperties": False,
    }


@pytest.mark.parametrize(
    ("prompt", "pattern"), [("What is your phone number?", PHONE), ("Name a date.", DATE)]
)
def test_regex_outputs_match(engine, prompt, pattern):
    outputs = sampled(engine, prompt, StructuredOutput(regex=pattern), max_tokens=24)
    for output in outputs.values():
        assert output.finish_reason == "stop" and re.fullmatch(pattern, output.text), output


def test_choices_with_regex_meta_characters_are_literal(engine):
    outputs = sampled(engine, "Pick one.", StructuredOutput(choice=META_CHOICES), seeds=(1, 2, 3, 4, 5))
    for output in outputs.values():
        assert output.finish_reason == "stop" and output.text in META_CHOICES, output


def test_json_object_gives_an_object(engine):
    constraint = StructuredOutput(json_object=True)
    outputs = sampled(engine, "Give me a small JSON object with two keys.", constraint, seeds=(1, 2), max_tokens=64)
    for output in outputs.values():
        if output.finish_reason == "stop":
            assert isinstance(json.loads(output.text), dict), output
        else:
            assert output.text.startswith("{") and guide_accepts(engine, constraint, output.token_ids)
    assert outputs["greedy", 0].finish_reason == "stop"


@pytest.mark.parametrize(("grammar", "pattern"), [(LARK, LARK_PATTERN), (GBNF, GBNF_PATTERN)])
def test_grammar_outputs_match(engine, grammar, pattern):
    outputs = sampled(engine, "Greet me.", StructuredOutput(grammar=grammar), max_tokens=24)
    for output in outputs.values():
        assert output.finish_reason == "stop" and re.fullmatch(pattern, output.text), output


# ---- every sequence of a request ----


def test_n_samples_and_best_of_all_follow_the_constraint(engine):
    constraint = StructuredOutput(regex=PHONE)
    outputs = generate(
        engine,
        [
            request(engine, "n", "Phone number?", constraint, n=4, seed=7, max_tokens=16),
            request(engine, "best", "Phone number?", constraint, n=2, best_of=4, seed=7, max_tokens=16),
        ],
    )
    assert sorted(outputs) == [("best", 0), ("best", 1), ("n", 0), ("n", 1), ("n", 2), ("n", 3)]
    for output in outputs.values():
        assert output.finish_reason == "stop" and re.fullmatch(PHONE, output.text), output


@pytest.mark.parametrize(
    ("constraint", "valid"),
    [
        (StructuredOutput(choice=("alpha", "beta", "gamma delta")), {"alpha", "beta", "gamma delta"}.__contains__),
        (StructuredOutput(regex=r"[a-c]{2,4}-\d"), lambda text: re.fullmatch(r"[a-c]{2,4}-\d", text)),
    ],
    ids=["choice", "regex"],
)
def test_beam_search_beams_follow_the_constraint(engine, constraint, valid):
    outputs = generate(
        engine,
        [request(engine, "beam", "Pick.", constraint, n=2, use_beam_search=True, temperature=0.0, max_tokens=12)],
    )
    assert sorted(outputs) == [("beam", 0), ("beam", 1)]
    for output in outputs.values():
        assert output.finish_reason == "stop" and valid(output.text), output


# ---- speculative decoding ----

SMALL = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
REPEATING_JSON = "Repeat: " + " ".join(
    [json.dumps({"name": "Bob", "age": 3}), json.dumps({"name": "Bobby", "age": 33}), json.dumps(SMALL)]
)
REPEATING_WORDS = "Say: hello world, hello world, hello world, hello world, hello there, hello there"
# [a-z]+ then nothing: the prompt's ", hello" drafted after the second word is refused by the guide
SPEC_GBNF = 'root ::= "hello " [a-z]+ ", hello " [a-z]+'


def test_speculative_decoding_keeps_outputs_valid_and_greedy_identical(engine, spec_engine, caplog, monkeypatch):
    # every decoding sequence is drafted in full (the cost rule, which learns from step timings,
    # would shorten drafts differently from run to run); batches stay within max_decoding_seqs
    monkeypatch.setattr(
        "engine.spec_decode.speculator.best_draft_length", lambda available, *_, **__: available
    )
    cases = [
        (REPEATING_JSON, StructuredOutput(json=json.dumps(SMALL))),
        (REPEATING_WORDS, StructuredOutput(grammar=SPEC_GBNF)),
        (REPEATING_WORDS, StructuredOutput(regex=r"(hello [a-z]{1,8}, ){1,3}hello [a-z]{1,8}")),
    ]
    greedy = [request(engine, f"g{i}", p, c, temperature=0.0, max_tokens=24) for i, (p, c) in enumerate(cases)]
    samples = [
        request(engine, f"s{i}", p, c, temperature=1.0, seed=5, max_tokens=24) for i, (p, c) in enumerate(cases)
    ]
    drafted = spec_engine.core.stats().spec_decode_num_draft_tokens
    with caplog.at_level(logging.WARNING, logger="engine.processors.grammar"):
        ours = {**generate(spec_engine, greedy), **generate(spec_engine, samples)}
    plain = generate(engine, greedy)
    assert spec_engine.core.stats().spec_decode_num_draft_tokens > drafted + 20
    assert "outside its guide" not in caplog.text
    for i, (_, constraint) in enumerate(cases):
        assert ours[f"g{i}", 0].token_ids == plain[f"g{i}", 0].token_ids, (ours[f"g{i}", 0], plain[f"g{i}", 0])
        for key in (f"g{i}", f"s{i}"):
            assert guide_accepts(spec_engine, constraint, ours[key, 0].token_ids), ours[key, 0]
    jsonschema.validate(json.loads(ours["g0", 0].text), SMALL)


# ---- constraints that cannot compile ----


@pytest.mark.parametrize(
    ("constraint", "named"),
    [
        (StructuredOutput(regex="(a"), "missing ), unterminated subpattern"),
        (StructuredOutput(regex="a{3,1}"), "min repeat greater than max repeat"),
        (StructuredOutput(regex="(?=a)b"), "look-around"),
        (StructuredOutput(json=json.dumps({"not": {"type": "string"}})), 'unimplemented keys: ["not"]'),
        (StructuredOutput(json=json.dumps({"type": "strin"})), "invalid type: strin"),
        (StructuredOutput(json=json.dumps({"type": "string", "pattern": "(?=a)b"})), "look-around"),
        (
            StructuredOutput(json=json.dumps({"type": "string", "format": "hostname"}), backend="outlines"),
            "format hostname",
        ),
        (
            StructuredOutput(json=json.dumps({"not": {"type": "string"}}), backend="outlines"),
            "unsupported json schema structure",
        ),
        (StructuredOutput(json="{not json"), "valid json"),
        (StructuredOutput(json="{not json", disable_additional_properties=True), "not valid json"),
        (StructuredOutput(grammar="start: foo("), "expected token ')'"),
        (StructuredOutput(grammar='root ::= "a'), "cannot be parsed as gbnf"),
    ],
)
def test_bad_constraint_fails_with_a_400_naming_the_problem(engine, constraint, named):
    (event,) = engine.generate_sync([request(engine, "bad", "Hi.", constraint)])
    assert isinstance(event, Failed) and event.status == 400, event
    assert named in event.message.lower(), event.message
    assert not engine.core.requests and not engine.core.awaiting_guides


def test_a_failed_compile_is_cached_and_the_next_request_fails_at_once(engine):
    constraint = StructuredOutput(regex="([0-9]")
    timings = engine.core.guides.timings
    first = engine.generate_sync([request(engine, "bad1", "Hi.", constraint)])
    compiled = len(timings)
    # the second is refused while it is added, in the same call, without another compile
    second = engine.step_sync([request(engine, "bad2", "Hi.", constraint)])
    assert [type(e) for e in first + second] == [Failed, Failed]
    assert second[0].message == first[0].message and second[0].request_id == "bad2"
    assert len(timings) == compiled and not engine.core.awaiting_guides


# ---- compiling off the engine thread ----


@pytest.fixture
def gated(engine, monkeypatch):
    """The engine's compiler blocks each compile until the test sets the event."""
    gate = threading.Event()
    guides = engine.core.guides
    original = guides._compile

    def compile_when_released(constraint):
        gate.wait(timeout=60)
        return original(constraint)

    monkeypatch.setattr(guides, "_compile", compile_when_released)
    yield gate
    gate.set()


def test_other_requests_step_while_a_guide_compiles(engine, gated):
    constraint = StructuredOutput(regex=r"wait-[0-9]{2}")
    core = engine.core
    events = engine.step_sync(
        [
            request(engine, "constrained", "Hi.", constraint, temperature=0.0, max_tokens=12),
            request(engine, "plain", "Hi.", None, temperature=0.0, max_tokens=40, ignore_eos=True),
        ]
    )
    for _ in range(5):
        events += engine.step_sync()
    assert {e.request_id for e in events} == {"plain"}
    assert sum(len(e.token_ids) for e in events) >= 5
    assert "constrained" in core.awaiting_guides and core.stats().num_waiting == 1
    assert core.stats().num_running == 1

    gated.set()
    core.wait_for_guides(timeout=60)
    assert not core.awaiting_guides or core.has_work
    while core.has_work:
        events += engine.step_sync()
    outputs = collect(engine, events)
    constrained = outputs["constrained", 0]
    assert constrained.finish_reason == "stop" and re.fullmatch(r"wait-[0-9]{2}", constrained.text)
    assert outputs["plain", 0].finish_reason == "length"
    assert core.stats().num_waiting == 0 and not core.requests


def test_abort_of_a_request_waiting_for_its_guide_leaves_nothing(engine, gated):
    constraint = StructuredOutput(regex=r"abort-[0-9]{2}")
    core = engine.core
    assert engine.step_sync([request(engine, "waiting", "Hi.", constraint)]) == []
    assert "waiting" in core.awaiting_guides
    future = core.awaiting_guides["waiting"][2]
    assert engine.step_sync([Abort("waiting")]) == []
    assert not core.awaiting_guides and core.stats().num_waiting == 0

    gated.set()
    future.result(timeout=60)
    assert not core.has_work
    assert engine.step_sync() == [] and not core.requests
    # the id is free again, and the compiled guide serves the next request at once
    outputs = generate(engine, [request(engine, "waiting", "Hi.", constraint, temperature=0.0)])
    assert re.fullmatch(r"abort-[0-9]{2}", outputs["waiting", 0].text)


def test_the_second_request_with_a_constraint_reuses_its_guide(engine):
    constraint = StructuredOutput(regex=r"cache-[a-z]{3}")
    timings = engine.core.guides.timings
    before = len(timings)
    generate(engine, [request(engine, "c1", "Hi.", constraint, max_tokens=12)])
    assert len(timings) == before + 1 and timings[-1].ok and timings[-1].kind == "regex"
    # a ready guide: the request starts as it is added, no compile, no wait
    events = engine.step_sync([request(engine, "c2", "Hi.", constraint, temperature=0.0, max_tokens=12)])
    assert "c2" in engine.core.requests and not engine.core.awaiting_guides
    while engine.core.has_work:
        events += engine.step_sync()
    assert re.fullmatch(r"cache-[a-z]{3}", collect(engine, events)["c2", 0].text)
    assert len(timings) == before + 1


# ---- the mask and the matchers ----


class FakeMatcher(Matcher):
    """Allows `steps[len(taken)]` next (the last set once past the end)."""

    def __init__(self, steps: list[set[int]]) -> None:
        self.steps = steps
        self.taken: list[int] = []

    def fill(self, row: torch.Tensor) -> None:
        for token in self.steps[min(len(self.taken), len(self.steps) - 1)]:
            bit = 1 << (token % 32)
            row[token // 32] |= bit - (1 << 32 if bit >= 1 << 31 else 0)  # as an int32

    def advance(self, token_id: int) -> bool:
        if token_id not in self.steps[min(len(self.taken), len(self.steps) - 1)]:
            return False
        self.taken.append(token_id)
        return True

    def rollback(self, count: int) -> None:
        del self.taken[len(self.taken) - count :]

    def copy(self) -> Matcher:
        clone = FakeMatcher(self.steps)
        clone.taken = list(self.taken)
        return clone


class FakeGuides:
    """A stand-in for GuideCompiler: each constraint's regex names its matcher."""

    def __init__(self, matchers: dict[str, FakeMatcher]) -> None:
        self.matchers = matchers

    def ready(self, constraint: StructuredOutput):
        matcher = self.matchers[constraint.regex]

        class Guide:
            def matcher(self) -> Matcher:
                return matcher

        return Guide()


def allowed_after_mask(mask: GrammarMask, keys: list[str], vocab: int = 70, drafts=None) -> list[set[int]]:
    logits = torch.zeros(len(keys), vocab)
    refs = [RowRef(key, (drafts or {}).get(key, ())) for key in keys]
    mask.apply(logits, list(range(len(keys))), refs)
    return [set(torch.isfinite(row).nonzero().view(-1).tolist()) for row in logits]


def test_grammar_mask_lets_a_finished_guide_end_with_every_eos_id():
    guide_eos, other_eos = 3, 66  # the guide knows only the first; the model ends with either
    matchers = {
        "done": FakeMatcher([{5, guide_eos}]),  # may continue with 5 or end
        "middle": FakeMatcher([{5, 40}]),  # may not end yet
        "past_end": FakeMatcher([set()]),  # allows nothing: it may still end
    }
    mask = GrammarMask(FakeGuides(matchers))
    for key in matchers:
        admission = Admission(SamplingParams(structured=StructuredOutput(regex=key)), (1, 2), {other_eos, guide_eos})
        assert mask.admit(key, admission)
    done, middle, past_end = allowed_after_mask(mask, list(matchers))
    assert done == {5, guide_eos, other_eos}
    assert middle == {5, 40}
    assert past_end == {guide_eos, other_eos}
    # ending with the other EOS id does not move the guide; a token does
    mask.accept("done", [other_eos])
    mask.accept("middle", [40])
    assert matchers["done"].taken == [] and matchers["middle"].taken == [40]


def test_grammar_mask_masks_draft_rows_at_the_drafted_state_and_rolls_back():
    matcher = FakeMatcher([{10}, {11}, {12}, {3}])
    mask = GrammarMask(FakeGuides({"g": matcher}))
    mask.admit("g", Admission(SamplingParams(structured=StructuredOutput(regex="g")), (), {3}))
    logits = torch.zeros(4, 40)
    refs = [RowRef("g", ()), RowRef("g", (10,)), RowRef("g", (10, 11)), RowRef("g", (10, 99))]
    mask.apply(logits, [0, 1, 2, 3], refs)
    rows = [set(torch.isfinite(row).nonzero().view(-1).tolist()) for row in logits]
    # a refused draft token (99): the row reuses the last state the guide reached
    assert rows == [{10}, {11}, {12}, {11}]
    assert matcher.taken == []  # every draft rolled back
    mask.fork("g", "child")
    mask.accept("g", [10])
    assert matcher.taken == [10] and mask._matchers["child"].taken == []


def test_matchers_survive_refused_tokens_and_long_rollbacks(engine):
    tokenizer = engine.tokenizer
    guides = engine.core.guides
    hello, there = tokenizer.encode("hello there", add_special_tokens=False)
    refused = tokenizer.encode("X", add_special_tokens=False)[0]
    grammar = guides.ready(StructuredOutput(grammar=LARK)).matcher()
    assert not grammar.advance(refused)  # refused without breaking the matcher
    assert grammar.advance(hello) and not grammar.advance(refused) and grammar.advance(there)
    grammar.rollback(1)
    assert grammar.advance(there)

    (a,) = tokenizer.encode("a", add_special_tokens=False)
    for constraint in (StructuredOutput(regex="a*b"), StructuredOutput(grammar="start: /a*b/")):
        matcher = guides.ready(constraint).matcher()
        assert all(matcher.advance(a) for _ in range(MAX_ROLLBACK + 8))
        matcher.rollback(MAX_ROLLBACK + 5)  # more than the guide keeps states for
        copy = matcher.copy()
        for m in (matcher, copy):
            row = torch.zeros((tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
            m.fill(row)
            assert (row[a // 32] >> (a % 32)) & 1
            assert m.advance(a)
