"""Property tests of structured output on SmolLM2-135M-Instruct (issue 9's acceptance): for generated
JSON schemas, regexes and choice lists, every constrained output sampled at temperature 1 over many
seeds validates.

What it proves, for each generated constraint and several seeds (one batch per constraint):
- JSON schemas (objects of 1-4 required properties: strings with maxLength <= 12, integers, numbers,
  booleans, string enums with JSON's special characters, integer arrays with maxItems <= 3, one level
  of nested object): every output that stops parses and passes `jsonschema.validate`; an output cut
  by max_tokens is a prefix the guide accepts; and most outputs stop;
- regexes built from safe pieces (literals, escaped meta characters, classes, `.`, bounded
  repetitions, alternations): every output stops (max_tokens covers the longest match) and
  `re.fullmatch`es;
- choice lists (1-5 strings of printable text with regex meta characters and non-ASCII letters):
  every output stops and is one of the choices.

- integers with `minimum`/`maximum` stay in bounds (JSON schemas compile with llguidance, which
  enforces them; outlines-core 0.2 drops them without a word);
- named and "required" tool choices: for generated tools, every output parses as the call(s) the
  chat endpoint reads from it, each naming an offered tool with arguments that validate against its
  parameters.

Left out on purpose: unbounded strings and arrays (a sample may not end within max_tokens).

Size: `SANSLLM_PROPERTY_EXAMPLES` (default 8) is the number of JSON schemas tried; regexes and choice
lists, cheaper, get three times as many. The default keeps this module near a minute on 2 cores;
`SANSLLM_PROPERTY_EXAMPLES=100 pytest tests/engine/test_structured_properties.py` runs a longer
search. Examples are derandomized: each run tries the same constraints.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from collections.abc import Sequence

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.engine import Engine, EngineConfig
from engine.model_files import DEFAULT_MODEL
from protocol.engine_api import Generate, SamplingParams, StructuredOutput, Tokens
from protocol.output.deltas import join
from protocol.output.forced import NamedToolCall, RequiredToolCalls
from protocol.requests import ChatCompletionRequest, decode_request
from protocol.validation import chat_sampling_params

EXAMPLES = int(os.environ.get("SANSLLM_PROPERTY_EXAMPLES", "8"))
SEEDS = (11, 22, 33, 44)
JSON_MAX_TOKENS = 96


def property_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def engine() -> Engine:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/engine/test_smollm2_batching.py (2 shared cores)
    engine = Engine(
        EngineConfig(
            model=DEFAULT_MODEL, dtype="float32", progress=False, max_model_len=512, kv_cache_memory="64MiB"
        )
    )
    yield engine
    engine.shutdown()
    torch.set_num_threads(threads)


def sample(engine: Engine, prompt: str, constraint: StructuredOutput, max_tokens: int):
    """(text, token ids, finish reason) of one temperature-1 sample per seed, all in one batch."""
    prompt_ids = tuple(engine.tokenizer.encode(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"))
    commands = [
        Generate(
            f"s{seed}",
            prompt_ids,
            SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured=constraint),
        )
        for seed in SEEDS
    ]
    tokens: dict[str, list[int]] = {f"s{seed}": [] for seed in SEEDS}
    finish: dict[str, str | None] = {}
    for event in engine.generate_sync(commands):
        assert isinstance(event, Tokens), f"{constraint}: {event}"
        tokens[event.request_id].extend(event.token_ids)
        if event.finish_reason:
            finish[event.request_id] = event.finish_reason
    return [(engine.tokenizer.decode(ids), ids, finish.get(rid)) for rid, ids in tokens.items()]


def guide_accepts(engine: Engine, constraint: StructuredOutput, token_ids: Sequence[int]) -> bool:
    matcher = engine.core.guides.ready(constraint).matcher()
    eos = engine.tokenizer.eos_token_ids
    return all(matcher.advance(token) for token in token_ids if token not in eos)


# ---- JSON schemas ----

NAMES = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8)
ENUM_TEXT = st.text(alphabet=string.ascii_letters + string.digits + ' -_.+"\\/é中', min_size=1, max_size=8)


@st.composite
def string_schemas(draw) -> dict:
    longest = draw(st.integers(1, 12))
    schema = {"type": "string", "maxLength": longest}
    if draw(st.booleans()):
        schema["minLength"] = draw(st.integers(0, longest))
    return schema


SCALARS = st.one_of(
    string_schemas(),
    st.just({"type": "integer"}),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.lists(ENUM_TEXT, min_size=1, max_size=4, unique=True).map(lambda values: {"enum": values}),
    st.integers(1, 3).map(lambda most: {"type": "array", "items": {"type": "integer"}, "maxItems": most}),
    st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
        lambda low_span: {"type": "integer", "minimum": low_span[0], "maximum": low_span[0] + low_span[1]}
    ),
)


def objects(values: st.SearchStrategy, most: int) -> st.SearchStrategy:
    return st.dictionaries(NAMES, values, min_size=1, max_size=most).map(
        lambda properties: {"type": "object", "properties": properties, "required": list(properties)}
    )


SCHEMAS = objects(st.one_of(SCALARS, SCALARS, objects(SCALARS, 2)), 4)


def test_sampled_outputs_of_generated_json_schemas_validate(engine):
    finishes: Counter[str | None] = Counter()

    @property_settings(EXAMPLES)
    @given(schema=SCHEMAS)
    def check(schema: dict) -> None:
        constraint = StructuredOutput(json=json.dumps(schema))
        for text, token_ids, finish in sample(engine, "Give me JSON data.", constraint, JSON_MAX_TOKENS):
            finishes[finish] += 1
            if finish == "stop":
                jsonschema.validate(json.loads(text), schema)
            else:
                assert finish == "length" and guide_accepts(engine, constraint, token_ids), (schema, text)

    check()
    assert finishes["stop"] >= 0.75 * sum(finishes.values()), finishes


# ---- regexes ----

# (regex, longest match in characters)
LITERALS = [(c, 1) for c in "abxyz0159 :/@_,"] + [(re.escape(c), 1) for c in ".+()*?[$"]
CLASSES = [("[a-z]", 1), ("[A-Z]", 1), ("[0-9]", 1), (r"\d", 1), ("[a-f0-9]", 1), ("[xyz]", 1), (".", 1)]


@st.composite
def repeated(draw, atom: tuple[str, int]) -> tuple[str, int]:
    text, longest = atom
    kind = draw(st.sampled_from(["once", "?", "{n}", "{m,n}"]))
    if kind == "once":
        return text, longest
    if kind == "?":
        return text + "?", longest
    if kind == "{n}":
        n = draw(st.integers(1, 3))
        return f"{text}{{{n}}}", longest * n
    low = draw(st.integers(0, 3))
    high = draw(st.integers(max(low, 1), 4))
    return f"{text}{{{low},{high}}}", longest * high


SIMPLE_ATOMS = st.sampled_from(LITERALS + CLASSES).flatmap(repeated)


@st.composite
def sequences(draw, atoms: st.SearchStrategy, most: int) -> tuple[str, int]:
    parts = draw(st.lists(atoms, min_size=1, max_size=most))
    return "".join(text for text, _ in parts), sum(longest for _, longest in parts)


@st.composite
def alternations(draw) -> tuple[str, int]:
    branches = draw(st.lists(sequences(SIMPLE_ATOMS, 2), min_size=2, max_size=3))
    group = "(" + "|".join(text for text, _ in branches) + ")"
    longest = max(longest for _, longest in branches)
    return (group + "?", longest) if draw(st.booleans()) else (group, longest)


REGEXES = sequences(st.one_of(SIMPLE_ATOMS, SIMPLE_ATOMS, alternations()), 4)


def test_sampled_outputs_of_generated_regexes_match(engine):
    @property_settings(3 * EXAMPLES)
    @given(regex=REGEXES)
    def check(regex: tuple[str, int]) -> None:
        pattern, longest = regex
        constraint = StructuredOutput(regex=pattern)
        # a character is at most 4 bytes, each byte at most a token: every match fits, so all stop
        for text, _, finish in sample(engine, "Write something.", constraint, 4 * longest + 4):
            assert finish == "stop" and re.fullmatch(pattern, text), (pattern, text, finish)

    check()


# ---- choice lists ----

CHOICE_TEXT = st.text(
    alphabet=string.ascii_letters + string.digits + " " + r".+*?()|[]{}^$\-#&~" + "\"'éü中",
    min_size=1,
    max_size=10,
)


def test_sampled_outputs_of_generated_choice_lists_are_choices(engine):
    @property_settings(3 * EXAMPLES)
    @given(choices=st.lists(CHOICE_TEXT, min_size=1, max_size=5, unique=True))
    def check(choices: list[str]) -> None:
        constraint = StructuredOutput(choice=tuple(choices))
        longest = max(len(choice) for choice in choices)
        for text, _, finish in sample(engine, "Pick one.", constraint, 4 * longest + 4):
            assert finish == "stop" and text in choices, (choices, text, finish)

    check()



# ---- forced tool calls ----

TOOLS = st.lists(
    st.tuples(st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=10), SCHEMAS),
    min_size=1,
    max_size=2,
    unique_by=lambda tool: tool[0],
)


def test_named_and_required_tool_calls_parse_against_their_schemas(engine):
    """The chat endpoint's own path: its constraint for the tool_choice (protocol.validation), the
    engine's guide, and the reader that turns the output into calls (protocol.output.forced)."""

    @property_settings(max(2, EXAMPLES // 2))
    @given(tools=TOOLS, named=st.booleans())
    def check(tools: list[tuple[str, dict]], named: bool) -> None:
        offered = [{"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in tools]
        choice = {"type": "function", "function": {"name": tools[0][0]}} if named else "required"
        body = {"messages": [{"role": "user", "content": "Call a tool."}], "tools": offered, "tool_choice": choice}
        request = decode_request(json.dumps(body).encode(), ChatCompletionRequest)
        constraint = chat_sampling_params(request, _ModelFacts(engine), 16, 20).structured
        assert constraint is not None
        parameters = dict(tools)
        stopped = 0
        for text, _, finish in sample(engine, "Call a tool.", constraint, 2 * JSON_MAX_TOKENS):
            if finish != "stop":
                continue
            stopped += 1
            reader = NamedToolCall(tools[0][0]) if named else RequiredToolCalls()
            _, _, calls = join([reader.feed(text), reader.finish()])
            assert calls, text
            for call in calls:
                jsonschema.validate(json.loads(call.arguments), parameters[call.name])
        assert stopped, "no sample finished within max_tokens"

    check()


class _ModelFacts:
    """What chat_sampling_params reads of a served model, from the engine."""

    def __init__(self, engine: Engine) -> None:
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.generation_defaults: dict = {}
