"""best_of: best_of candidates sampled, the n with the highest cumulative logprob returned, re-indexed."""

from __future__ import annotations

import pytest

from engine.best_of import BestOfCollector
from protocol.engine_api import Abort, Tokens
from tests.engine.test_engine import finals, gen, new_engine, outputs


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return new_engine(tiny_llama)


def test_returns_the_n_most_likely_candidates_best_first_and_counts_every_token(engine):
    params = {"max_tokens": 6, "temperature": 1.0, "seed": 7}
    samples = engine.generate_sync([gen("all", n=5, **params)])  # the same 5 draws, all returned
    events = engine.generate_sync([gen("best", n=2, best_of=5, **params)])
    assert all(isinstance(e, Tokens) for e in events)
    assert [e.index for e in events] == [0, 1]  # held back, then sent once each, finished
    ids = outputs(samples)
    ranked = sorted(finals(samples).values(), key=lambda e: e.cumulative_logprob, reverse=True)
    assert [e.token_ids for e in events] == [tuple(ids["all", e.index]) for e in ranked[:2]]
    assert [e.cumulative_logprob for e in events] == [e.cumulative_logprob for e in ranked[:2]]
    assert events[0].num_discarded_tokens == 3 * 6 and events[1].num_discarded_tokens == 0
    assert all(e.finish_reason == "length" for e in events)


def test_logprobs_of_the_chosen_candidate_cover_its_whole_output(engine):
    (event,) = engine.generate_sync([gen("lp", n=1, best_of=3, max_tokens=4, logprobs=2, seed=3)])
    assert [entry.token_id for entry in event.logprobs] == list(event.token_ids)
    assert sum(entry.logprob for entry in event.logprobs) == pytest.approx(event.cumulative_logprob)


def test_abort_frees_every_candidate(engine):
    engine.step_sync([gen("ab", n=1, best_of=4, max_tokens=50)])
    assert engine.core.kv.pool.usage() > 0
    assert engine.step_sync([Abort("ab", 0)]) == []  # no sample index the client saw: ignored
    engine.step_sync([Abort("ab")])
    assert engine.core.kv.pool.usage() == 0 and not engine.core.has_work


def test_collector_waits_for_every_candidate_and_merges_each_one_s_events():
    collector = BestOfCollector(n=1, best_of=2)

    def tokens(index, ids, cumulative, finish=None):
        return Tokens("r", index, ids, 3, finish_reason=finish, cumulative_logprob=cumulative)

    assert collector.collect(tokens(0, (1,), -1.0)) == []
    assert collector.collect(tokens(1, (5,), -0.5)) == []
    assert collector.collect(tokens(0, (2,), -2.0, "length")) == []
    (chosen,) = collector.collect(tokens(1, (6,), -1.5, "stop"))
    assert (chosen.index, chosen.token_ids, chosen.finish_reason) == (0, (5, 6), "stop")
    assert chosen.num_discarded_tokens == 2
