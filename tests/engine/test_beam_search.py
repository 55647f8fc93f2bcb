"""Beam search: its rules (unit), its paged-cache forks on a tiny model, and its quality on SmolLM2."""

from __future__ import annotations

import pytest

from engine.beam_search import BeamSearch, BeamView, Candidate
from engine.engine import Engine, EngineConfig
from engine.model_files import DEFAULT_MODEL
from protocol.engine_api import Abort, Generate, SamplingParams, Tokens
from tests.engine.test_engine import PROMPT, finals, gen, new_engine, outputs

EOS = 0


# ---- the rules, on made-up candidates ----


def _search(**params) -> BeamSearch:
    params.setdefault("n", 2)
    params.setdefault("max_tokens", 10)
    return BeamSearch(SamplingParams(use_beam_search=True, **params), params["max_tokens"], {EOS})


def _round(search: BeamSearch, beams: dict[int, list[int]], offers: dict[int, list[tuple[int, float]]]):
    """Offer (token, cumulative logprob) candidates per beam, close the round."""
    for index, offered in offers.items():
        search.offer(index, [Candidate(cum, index, token, None) for token, cum in offered])
    assert search.ready(beams)
    return search.select({index: BeamView(tokens, None) for index, tokens in beams.items()})


def test_finished_candidates_leave_and_the_best_others_become_beams():
    search = _search(n=2)
    step = _round(search, {0: []}, {0: [(EOS, -0.5), (5, -1.0), (6, -2.0), (7, -3.0)]})
    assert [h.token_ids for h in search.finished] == [(EOS,)]
    assert step.extend == [(0, [Candidate(-1.0, 0, 5, None), Candidate(-2.0, 0, 6, None)])]
    assert step.release == [] and not step.done


def test_a_beam_nobody_extends_is_released():
    search = _search(n=2)
    step = _round(search, {0: [5], 1: [6]}, {0: [(8, -1.0), (9, -1.1)], 1: [(8, -4.0), (9, -5.0)]})
    assert step.release == [1]
    assert [(parent, [c.token_id for c in chosen]) for parent, chosen in step.extend] == [(0, [8, 9])]


def test_early_stopping_true_stops_once_width_have_finished():
    search = _search(n=2, early_stopping=True)
    step = _round(search, {0: []}, {0: [(EOS, -0.5), (5, -0.6), (6, -0.7), (7, -0.8)]})
    assert not step.done  # one finished
    step = _round(search, {0: [5], 1: [6]}, {0: [(EOS, -1.0), (8, -0.9)], 1: [(9, -1.0), (EOS, -5.0)]})
    assert step.done  # two finished, although a running beam scores better
    assert [h.token_ids for h in search.results()] == [(EOS,), (5, EOS)]


def test_early_stopping_false_stops_only_when_no_running_beam_can_win():
    search = _search(n=2, early_stopping=False)
    _round(search, {0: []}, {0: [(EOS, -0.5), (5, -0.6), (6, -0.7), (7, -0.8)]})
    step = _round(search, {0: [5], 1: [6]}, {0: [(EOS, -1.0), (8, -0.9)], 1: [(9, -1.0), (EOS, -5.0)]})
    assert not step.done  # the best running beam, -0.9 / 2, beats the worst finished, -1.0 / 2
    step = _round(search, {0: [5, 8], 1: [6, 9]}, {0: [(10, -4.0)], 1: [(11, -4.5)]})
    assert step.done  # -4.0 / 3 cannot beat -0.5


def test_early_stopping_never_waits_while_a_longer_beam_could_still_win():
    offers = {0: [(EOS, -2.0), (5, -2.5)]}  # finished: -2.0 / 1; running: -2.5 after 1 token
    assert _round(_search(n=1, max_tokens=10, early_stopping=False), {0: []}, offers).done
    never = _search(n=1, max_tokens=10, early_stopping="never")
    assert not _round(never, {0: []}, offers).done  # at 10 tokens, -2.5 / 10 would beat -2.0
    assert not _round(never, {0: [5]}, {0: [(6, -3.0), (7, -4.0)]}).done
    assert _round(never, {0: [5, 6]}, {0: [(8, -25.0)]}).done  # -25 / 10 cannot


@pytest.mark.parametrize(("length_penalty", "winner"), [(0.0, (EOS,)), (2.0, (5, 6, EOS))])
def test_length_penalty_decides_between_short_and_long(length_penalty, winner):
    search = _search(n=1, max_tokens=3, length_penalty=length_penalty, early_stopping="never")
    _round(search, {0: []}, {0: [(EOS, -1.0), (5, -1.2)]})
    _round(search, {0: [5]}, {0: [(6, -1.5), (7, -9.0)]})
    step = _round(search, {0: [5, 6]}, {0: [(EOS, -2.0), (8, -9.0)]})
    assert step.done
    assert search.results()[0].token_ids == winner  # scores: -1.0 vs -2.0 / 3 ** 2


def test_at_max_tokens_every_running_beam_finishes_with_length():
    search = _search(n=2, max_tokens=1)
    step = _round(search, {0: []}, {0: [(5, -1.0), (6, -2.0), (EOS, -3.0)]})
    assert step.done
    assert [(h.token_ids, h.finish_reason) for h in search.results()] == [((5,), "length"), ((6,), "length")]


# ---- on the paged cache (tiny model) ----


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return new_engine(tiny_llama)


def beam(request_id: str, prompt=PROMPT, **params) -> Generate:
    params.setdefault("max_tokens", 8)
    return gen(request_id, prompt=prompt, use_beam_search=True, temperature=0.0, **params)


def test_returns_n_finished_sequences_once_best_first(engine):
    events = engine.generate_sync([beam("b", n=3, best_of=4, logprobs=1)])
    assert [e.index for e in events] == [0, 1, 2] and all(e.finish_reason == "length" for e in events)
    scores = [e.cumulative_logprob for e in events]
    assert scores == sorted(scores, reverse=True) and len({e.token_ids for e in events}) == 3
    for event in events:
        assert len(event.token_ids) == 8 and [lp.token_id for lp in event.logprobs] == list(event.token_ids)
        assert sum(lp.logprob for lp in event.logprobs) == pytest.approx(event.cumulative_logprob)


def test_beams_share_blocks_a_block_per_beam_not_a_prefix_per_beam(engine):
    prompt = tuple(range(3, 100))  # 97 tokens: 7 blocks of 16
    pool = engine.core.kv.pool
    engine.step_sync([beam("share", prompt=prompt, n=4, max_tokens=20)])
    peak = 0
    while engine.core.has_work:
        engine.step_sync()
        peak = max(peak, pool.num_blocks - pool.num_free_blocks)
    # the prompt's 7 blocks once, plus each beam's own tail (20 tokens: 2 blocks) and a copy in flight
    assert peak <= 7 + 4 * 3
    assert peak < 4 * 7  # a prefix per beam would take this much


def test_copy_on_write_gives_the_output_of_a_run_that_shares_nothing(engine, tiny_llama):
    request = beam("cow", prompt=tuple(range(3, 40)), n=4, max_tokens=12, logprobs=0)
    shared = engine.generate_sync([request])
    alone = new_engine(tiny_llama, enable_prefix_caching=False)
    scheduler = alone.core.scheduler
    fork = scheduler.fork

    def fork_without_sharing(parent, index):
        child = fork(parent, index)
        scheduler._preempt(child)  # drops the shared blocks: the child recomputes its whole sequence
        return child

    scheduler.fork = fork_without_sharing
    separate = alone.generate_sync([request])
    assert scheduler.num_preemptions > 0
    assert [e.token_ids for e in shared] == [e.token_ids for e in separate]
    for ours, theirs in zip(shared, separate, strict=True):
        assert ours.cumulative_logprob == pytest.approx(theirs.cumulative_logprob, abs=1e-4)


def test_abort_mid_search_frees_every_block(engine):
    engine.step_sync([beam("gone", n=4, max_tokens=50)])
    for _ in range(5):
        engine.step_sync()
    assert len(engine.core.requests["gone"].samples) == 4
    assert engine.core.kv.pool.usage() > 0
    engine.step_sync([Abort("gone")])
    assert engine.core.kv.pool.usage() == 0 and not engine.core.has_work


def test_beam_requests_batch_with_sampled_ones(engine):
    events = engine.generate_sync([beam("b", n=2), gen("s", max_tokens=5, temperature=0.0)])
    assert len(outputs(events)["s", 0]) == 5
    assert sorted(index for (rid, index) in finals(events) if rid == "b") == [0, 1]


# ---- quality on SmolLM2 ----

SMOLLM2_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "The best way to learn programming is",
    "Water boils at",
    "My favourite food is",
    "The sun rises in the",
    "In 1492, Columbus",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "A good night's sleep",
]


@pytest.fixture(scope="module")
def smollm2() -> Engine:
    return Engine(EngineConfig(model=DEFAULT_MODEL, dtype="float32", progress=False))


def _run(engine: Engine, **params) -> dict[int, Tokens]:
    commands = [
        Generate(str(i), tuple(engine.tokenizer.encode(text)), SamplingParams(max_tokens=10, **params))
        for i, text in enumerate(SMOLLM2_PROMPTS)
    ]
    events = engine.generate_sync(commands)
    ids = outputs(events)
    return {
        int(rid): Tokens(rid, 0, tuple(ids[rid, 0]), 0, cumulative_logprob=last.cumulative_logprob)
        for (rid, index), last in finals(events).items()
        if index == 0
    }


def test_smollm2_width_1_is_greedy_and_width_4_is_at_least_as_likely(smollm2):
    greedy = _run(smollm2, temperature=0.0)
    width_1 = _run(smollm2, temperature=0.0, use_beam_search=True, n=1)
    width_4 = _run(smollm2, temperature=0.0, use_beam_search=True, n=1, best_of=4)
    assert len(greedy) == len(width_1) == len(width_4) == 10
    for i in range(10):
        assert width_1[i].token_ids == greedy[i].token_ids
        assert width_1[i].cumulative_logprob == pytest.approx(greedy[i].cumulative_logprob, abs=1e-3)
        assert width_4[i].cumulative_logprob >= greedy[i].cumulative_logprob - 1e-3
    assert any(width_4[i].cumulative_logprob > greedy[i].cumulative_logprob + 1e-3 for i in range(10))


def test_few_seats_and_few_blocks_still_finish_every_search_with_the_same_result(engine, tiny_llama):
    requests = [beam("x", n=3, max_tokens=20), beam("y", prompt=PROMPT[::-1], n=3, max_tokens=20)]
    expected = engine.generate_sync(requests)
    # three seats for six beams (idle beams hold none), and blocks so few that beams are preempted
    tight = new_engine(tiny_llama, max_num_seqs=3, num_kv_blocks=5, max_model_len=64)
    events = tight.generate_sync(requests)
    assert tight.core.scheduler.num_preemptions > 0
    assert {(e.request_id, e.index): e.token_ids for e in events} == {
        (e.request_id, e.index): e.token_ids for e in expected
    }
    assert tight.core.kv.pool.usage() == 0
