"""Logits processors: each one's effect on the tiny model's real output through the engine, their state
across preemption, which rows they are given, and what a speculative draft means to them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from engine.engine import Engine, EngineConfig
from engine.loader import LoadedModel, load_model
from engine.model_files import resolve_model
from engine.processors import Admission, LogitsPipeline, LogitsProcessor, RowRef, builtin_processors
from engine.sampler import Sampler, SamplingRow
from protocol.engine_api import Generate, SamplingParams, Tokens

PROMPT = (5, 17, 42, 99, 3, 250, 7)


@pytest.fixture(scope="module")
def loaded(tiny_llama: Path) -> LoadedModel:
    return load_model(resolve_model(str(tiny_llama)), progress=False)


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Engine:
    return new_engine(loaded)


def new_engine(loaded: LoadedModel, **config) -> Engine:
    return Engine(EngineConfig(model="tiny", progress=False, **config), loaded=loaded)


def gen(request_id: str, prompt=PROMPT, **params) -> Generate:
    params.setdefault("ignore_eos", True)
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 24)
    return Generate(request_id, tuple(prompt), SamplingParams(**params))


def outputs(events) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for event in events:
        assert isinstance(event, Tokens), event
        out[event.request_id].extend(event.token_ids)
    return dict(out)


def run(engine: Engine, **params) -> list[int]:
    return outputs(engine.generate_sync([gen("r", **params)]))["r"]


@pytest.fixture(scope="module")
def greedy(engine: Engine) -> list[int]:
    tokens = run(engine)
    assert len(set(tokens)) < len(tokens)  # the tiny model repeats itself, which the penalties act on
    return tokens


# ---- each processor's effect on real output ----


def test_allowed_token_ids_restrict_sampled_output(engine):
    allowed = (3, 40, 41, 200, 301)
    tokens = run(engine, temperature=1.0, seed=3, allowed_token_ids=allowed, max_tokens=30)
    assert set(tokens) <= set(allowed) and len(set(tokens)) > 1


def test_logit_bias_forces_a_token_and_bans_another(engine, greedy):
    assert run(engine, logit_bias={123: 100.0}, max_tokens=5) == [123] * 5
    banned = run(engine, logit_bias={greedy[0]: -100.0}, max_tokens=5)
    assert banned[0] != greedy[0] and greedy[0] not in banned


def test_a_one_token_bad_word_never_appears(engine, greedy):
    word = greedy[3]  # repeated in the greedy output
    tokens = run(engine, bad_words_token_ids=((word,),))
    assert tokens[:3] == greedy[:3] and word not in tokens


def test_a_two_token_bad_word_bans_its_last_token_only_after_the_first(engine, greedy):
    first, last = greedy[3], greedy[4]
    tokens = run(engine, bad_words_token_ids=((first, last),))
    assert tokens[:4] == greedy[:4] and tokens[4] != last
    assert not any(a == first and b == last for a, b in zip(tokens, tokens[1:], strict=False))


def test_min_tokens_holds_stop_ids_back_until_reached(engine, greedy):
    stop = greedy[1]
    stopped = outputs(engine.generate_sync([gen("s", stop_token_ids=(stop,))]))["s"]
    assert stopped == greedy[:2]  # stops at once
    held = outputs(engine.generate_sync([gen("h", stop_token_ids=(stop,), min_tokens=4)]))["h"]
    assert held[0] == greedy[0] and stop not in held[:4] and len(held) >= 4


def test_min_tokens_holds_eos_back_unless_ignored(loaded, greedy):
    engine = new_engine(loaded)
    engine.core.eos_token_ids = frozenset({greedy[2]})  # as if the model declared it EOS
    assert run(engine, ignore_eos=False) == greedy[:3]
    held = run(engine, ignore_eos=False, min_tokens=8)
    assert greedy[2] not in held[:8] and len(held) >= 8
    assert run(engine, ignore_eos=True, min_tokens=8) == greedy  # nothing to hold back


def test_presence_penalty_breaks_a_greedy_repetition(engine, greedy):
    tokens = run(engine, presence_penalty=1.5)
    first_repeat = next(i for i, t in enumerate(greedy) if t in greedy[:i])
    assert tokens[:first_repeat] == greedy[:first_repeat]  # nothing seen twice yet: no change
    assert tokens[first_repeat] != greedy[first_repeat]
    assert len(set(tokens)) > len(set(greedy))


def test_frequency_and_repetition_penalties_change_greedy_output(engine, greedy):
    for params in ({"frequency_penalty": 1.0}, {"repetition_penalty": 1.5}):
        tokens = run(engine, **params)
        assert tokens != greedy and len(set(tokens)) > len(set(greedy)), params


def test_penalised_and_plain_requests_in_one_batch_match_their_runs_alone(engine, greedy):
    penalised = run(engine, presence_penalty=1.5, bad_words_token_ids=((greedy[5],),))
    together = outputs(
        engine.generate_sync(
            [
                gen("plain"),
                gen("pen", presence_penalty=1.5, bad_words_token_ids=((greedy[5],),)),
                gen("other", prompt=(9, 8, 7), logit_bias={11: 5.0}, min_tokens=3, stop_token_ids=(4,)),
            ]
        )
    )
    assert together["plain"] == greedy and together["pen"] == penalised


# ---- state across preemption ----


def test_processor_state_survives_preemption(loaded):
    """A KV-starved engine preempts and recomputes sequences; their processors' state (penalty counts,
    bad-word prefixes, min_tokens counts) is unchanged, so the tokens are the same as an unstarved run."""
    params = dict(
        max_tokens=40,
        presence_penalty=0.8,
        frequency_penalty=0.3,
        repetition_penalty=1.2,
        min_tokens=30,
        ignore_eos=False,
        stop_token_ids=(16, 161),
    )
    requests = [
        gen(
            f"r{i}",
            prompt=tuple((11 * i + 5 * j) % 300 for j in range(20)),
            bad_words_token_ids=((7 + i,), (16, 161)),
            **params,
        )
        for i in range(6)
    ]
    requests.append(gen("seeded", prompt=PROMPT * 3, temperature=1.0, seed=4, **params))
    alone = {}
    for request in requests:
        alone.update(outputs(new_engine(loaded).generate_sync([request])))
    starved = new_engine(loaded, num_kv_blocks=10)  # 160 tokens for seven requests of about 60
    together = outputs(starved.generate_sync(requests))
    assert starved.stats().num_preemptions > 0
    assert together == alone
    assert all(len(tokens) >= 30 for tokens in alone.values())


# ---- the pipeline: rows, lifecycle, drafts ----


class Recording(LogitsProcessor):
    """Admits the sequences whose key starts with 'yes'; records what it is told."""

    def __init__(self) -> None:
        self.applied: list[list[tuple[int, RowRef]]] = []
        self.accepted: list[tuple[str, tuple[int, ...]]] = []
        self.released: list[str] = []

    def admit(self, key: str, admission: Admission) -> bool:
        return key.startswith("yes")

    def apply(self, logits: torch.Tensor, rows: Sequence[int], refs: Sequence[RowRef]) -> None:
        self.applied.append(list(zip(rows, refs, strict=True)))

    def accept(self, key: str, token_ids: Sequence[int]) -> None:
        self.accepted.append((key, tuple(token_ids)))

    def release(self, key: str) -> None:
        self.released.append(key)


def test_rows_without_a_processor_are_not_passed_to_it():
    recording = Recording()
    pipeline = LogitsPipeline([recording])
    admission = Admission(SamplingParams(), (1, 2))
    for key in ("yes-a", "no-b", "yes-c"):
        pipeline.admit(key, admission)
    pipeline.apply(
        torch.zeros(4, 8), [RowRef("no-b"), RowRef("yes-a"), RowRef("yes-c", (3,)), RowRef("no-b")]
    )
    assert recording.applied == [[(1, RowRef("yes-a")), (2, RowRef("yes-c", (3,)))]]
    pipeline.accept("no-b", [5])
    pipeline.accept("yes-a", [5])
    pipeline.release("no-b")
    pipeline.release("yes-a")
    assert recording.accepted == [("yes-a", (5,))] and recording.released == ["yes-a"]
    recording.applied.clear()
    pipeline.apply(torch.zeros(1, 8), [RowRef("no-b")])
    assert recording.applied == []  # no user among the rows: not called at all


def test_engine_passes_each_builtin_processor_only_its_sequences(loaded):
    engine = new_engine(loaded)
    seen: dict[str, set[str]] = defaultdict(set)
    for processor in engine.core.sampler.pipeline.processors:
        original = processor.apply

        def spy(logits, rows, refs, original=original, name=type(processor).__name__):
            seen[name].update(ref.key.split("\x00")[0] for ref in refs)
            original(logits, rows, refs)

        processor.apply = spy  # type: ignore[method-assign]
    engine.generate_sync(
        [
            gen("plain", max_tokens=6),
            gen("pen", max_tokens=6, presence_penalty=1.0),
            gen("bias", logit_bias={3: 1.0}),
        ]
    )
    assert dict(seen) == {"Penalties": {"pen"}, "LogitBias": {"bias"}}


def test_min_tokens_leaves_the_pipeline_once_reached():
    sampler = Sampler()
    sampler.admit("k", SamplingParams(min_tokens=2, stop_token_ids=(1,)), (0,))
    min_tokens = next(p for p in sampler.pipeline.processors if type(p).__name__ == "MinTokens")
    index = sampler.pipeline.processors.index(min_tokens)
    sampler.accept("k", [3])
    assert "k" in sampler.pipeline._users[index]
    sampler.accept("k", [3])
    assert "k" not in sampler.pipeline._users[index]
    sampler.release("k")


# every built-in processor has work here: allowed (a wide set), bias, a bad word whose prefix a draft
# completes, min_tokens that a draft reaches, and all three penalties over prompt, output and draft
ALL_ON = SamplingParams(
    allowed_token_ids=tuple(range(2, 30)),
    logit_bias={4: 2.0, 9: -1.5},
    bad_words_token_ids=((7,), (5, 6, 8), (11, 12)),
    min_tokens=4,
    stop_token_ids=(3,),
    repetition_penalty=1.3,
    frequency_penalty=0.4,
    presence_penalty=0.7,
)
EOS = frozenset({2})


def processed(sampler: Sampler, rows: list[SamplingRow], seed: int = 0) -> torch.Tensor:
    """The same random logits in every row, through `sampler`'s processors."""
    logits = (torch.randn(32, generator=torch.Generator().manual_seed(seed)) * 3).repeat(len(rows), 1)
    sampler.process(logits, rows)
    return logits


@pytest.mark.parametrize(
    "output, draft",
    [((), (5, 6)), ((5,), (6,)), ((4, 4), (11, 20, 5, 6)), ((5, 6), ()), ((10,), (10, 10, 21))],
)
def test_a_draft_means_the_same_as_accepting_it_first(output, draft):
    """A verification row with a draft is processed as if the draft were output, without keeping it."""
    prompt = (13, 14, 4)
    drafted, accepted = Sampler(), Sampler()
    drafted.admit("s", ALL_ON, prompt, EOS)
    accepted.admit("s", ALL_ON, prompt, EOS)
    drafted.accept("s", output)
    accepted.accept("s", output + draft)
    row = SamplingRow(ALL_ON, prompt, [], EOS, key="s")
    with_draft = processed(drafted, [SamplingRow(ALL_ON, prompt, [], EOS, key="s", draft=draft), row])
    torch.testing.assert_close(with_draft[0], processed(accepted, [row])[0])
    # the draft was not kept: the second row (no draft) saw the state as accepted before it
    torch.testing.assert_close(with_draft[1], processed(drafted, [row])[0])
    stateless = processed(Sampler(), [SamplingRow(ALL_ON, prompt, list(output + draft), EOS)])
    torch.testing.assert_close(with_draft[0], stateless[0])


def test_a_fork_starts_from_the_parent_state_and_then_goes_its_own_way():
    sampler = Sampler()
    sampler.admit("parent", ALL_ON, (13, 4), EOS)
    sampler.accept("parent", [5, 10])
    sampler.fork("parent", "child")
    parent, child = SamplingRow(ALL_ON, (), [], key="parent"), SamplingRow(ALL_ON, (), [], key="child")
    same = processed(sampler, [parent, child])
    torch.testing.assert_close(same[0], same[1])
    sampler.accept("child", [6, 20, 20])
    sampler.accept("parent", [21])
    apart = processed(sampler, [parent, child])
    expected = processed(
        Sampler(),
        [
            SamplingRow(ALL_ON, (13, 4), [5, 10, 21], EOS),
            SamplingRow(ALL_ON, (13, 4), [5, 10, 6, 20, 20], EOS),
        ],
    )
    torch.testing.assert_close(apart, expected)
    sampler.release("parent")
    sampler.release("child")


def test_released_slots_are_reused_without_stale_state():
    sampler = Sampler()
    params = SamplingParams(frequency_penalty=1.0)
    sampler.admit("old", params, (1,))
    sampler.accept("old", [7, 7, 8])
    processed(sampler, [SamplingRow(params, (), [], key="old")])  # its tokens reach the device tensors
    sampler.release("old")
    sampler.admit("new", params, (1,))
    sampler.accept("new", [9])
    fresh = processed(sampler, [SamplingRow(params, (), [], key="new")])
    torch.testing.assert_close(fresh, processed(Sampler(), [SamplingRow(params, (1,), [9])]))


def test_the_builtin_order_is_vllms():
    names = [type(p).__name__ for p in builtin_processors()]
    assert names == ["AllowedTokenIds", "LogitBias", "BadWords", "MinTokens", "Penalties"]


def test_a_row_of_a_sequence_never_admitted_is_an_error():
    with pytest.raises(KeyError):
        Sampler().process(torch.zeros(1, 8), [SamplingRow(SamplingParams(), (), [], key="ghost")])


def test_target_logits_are_what_the_draw_samples_from():
    sampler = Sampler()
    params = SamplingParams(temperature=0.5, top_k=3, logit_bias={1: 1.0})
    sampler.admit("s", params, (0,))
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5, -1.0]])
    target = sampler.target_logits(logits.clone(), [SamplingRow(params, (), [], key="s")])
    # bias: [1, 3, 3, 0.5, -1]; temperature 0.5: [2, 6, 6, 1, -2]; top_k 3 keeps 6, 6 and 2
    torch.testing.assert_close(target, torch.tensor([[2.0, 6.0, 6.0, float("-inf"), float("-inf")]]))
