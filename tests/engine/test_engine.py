"""The engine's behaviour as its runtime sees it: commands in, one batch of events per step out."""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from engine.engine import Engine, EngineConfig
from engine.offline import LLM, GenerationFailed
from protocol.engine_api import (
    Abort,
    Encode,
    Failed,
    Generate,
    PoolingParams,
    SamplingParams,
    Tokens,
)

PROMPT = (5, 17, 42, 99, 3, 250, 7)
TIMEOUT = 30


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Engine:
    """For synchronous use (generate_sync / step_sync); never started."""
    return Engine(EngineConfig(model=str(tiny_llama), progress=False))


def new_engine(folder: Path, **config) -> Engine:
    return Engine(EngineConfig(model=str(folder), progress=False, **config))


def gen(request_id: str, prompt=PROMPT, priority: int = 0, **params) -> Generate:
    params.setdefault("ignore_eos", True)
    return Generate(request_id, tuple(prompt), SamplingParams(**params), priority)


def outputs(events) -> dict[tuple[str, int], list[int]]:
    out: dict[tuple[str, int], list[int]] = defaultdict(list)
    for event in events:
        if isinstance(event, Tokens):
            out[event.request_id, event.index].extend(event.token_ids)
    return dict(out)


def finals(events) -> dict[tuple[str, int], Tokens]:
    return {(e.request_id, e.index): e for e in events if isinstance(e, Tokens) and e.finish_reason}


class Recorder:
    """An `on_events` callback that records each call and the thread it ran on."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[str, list]] = queue.Queue()

    def __call__(self, events) -> None:
        self.calls.put((threading.current_thread().name, list(events)))

    def until_finished(self, request_ids: set[str], samples: int = 1) -> list[list]:
        """Calls up to the one where every sample of `request_ids` has finished or failed."""
        calls, done = [], defaultdict(int)
        while any(done[r] < samples for r in request_ids):
            thread, events = self.calls.get(timeout=TIMEOUT)
            assert thread == "sansllm-engine"
            calls.append(events)
            for e in events:
                if isinstance(e, Failed):
                    done[e.request_id] = samples
                elif isinstance(e, Tokens) and e.finish_reason:
                    done[e.request_id] += 1
        return calls


# ---- the thread ----


def test_engine_thread_calls_back_once_per_step(tiny_llama):
    engine = new_engine(tiny_llama)
    recorder = Recorder()
    engine.start(recorder)
    try:
        engine.submit([gen("a", max_tokens=5), gen("b", max_tokens=3)])
        calls = recorder.until_finished({"a", "b"})
    finally:
        engine.shutdown()
    # both prompts are admitted in the first step, then each step adds one token per running sample
    assert [sorted(e.request_id for e in events) for events in calls] == [["a", "b"]] * 3 + [["a"]] * 2
    assert all(len(e.token_ids) == 1 for events in calls for e in events)
    assert calls[2][1].finish_reason == "length" and calls[4][0].finish_reason == "length"
    assert engine.healthy is False  # shut down


def test_submit_is_thread_safe_and_requests_run_concurrently(tiny_llama):
    engine = new_engine(tiny_llama)
    recorder = Recorder()
    engine.start(recorder)
    try:
        ids = {f"r{i}" for i in range(8)}
        threads = [
            threading.Thread(target=engine.submit, args=([gen(r, max_tokens=4)],)) for r in sorted(ids)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        calls = recorder.until_finished(ids)
    finally:
        engine.shutdown()
    events = [e for events in calls for e in events]
    assert {r: len(t) for (r, _), t in outputs(events).items()} == dict.fromkeys(ids, 4)


class Fatal(BaseException):
    """Not an Exception: the engine does not restart a core for it, the thread dies (an ordinary
    exception is survived: tests/engine/test_engine_faults.py)."""


def test_engine_death_fails_pending_requests_and_later_submits(tiny_llama):
    engine = new_engine(tiny_llama)

    def broken_step():
        raise Fatal("kaboom")

    engine.core.step = broken_step
    recorder = Recorder()
    engine.start(recorder)
    engine.submit([gen("a", max_tokens=5), gen("bad", best_of=10**4)])
    _, events = recorder.calls.get(timeout=TIMEOUT)
    # the refusal made before the failing step still arrives, then the running request fails
    assert events[0] == Failed("bad", 400, "best_of=10000 exceeds the engine's max_num_seqs=256")
    assert events[1:] == [Failed("a", 500, "engine error: Fatal: kaboom")]
    assert engine.healthy is False
    # a later submit fails at once, on the submitting thread
    engine.submit([gen("b")])
    thread, events = recorder.calls.get_nowait()
    assert (thread, events) == (
        threading.current_thread().name,
        [Failed("b", 500, "engine error: Fatal: kaboom")],
    )


def test_shutdown_fails_running_requests_and_refuses_new_ones(tiny_llama):
    engine = new_engine(tiny_llama)
    recorder = Recorder()
    engine.start(recorder)
    engine.submit([gen("long", max_tokens=200)])
    recorder.calls.get(timeout=TIMEOUT)  # it is running
    engine.shutdown()
    rest = []
    while not recorder.calls.empty():
        rest.extend(recorder.calls.get()[1])
    assert rest[-1] == Failed("long", 503, "the engine is shutting down")
    engine.submit([gen("late")])
    assert recorder.calls.get(timeout=TIMEOUT)[1] == [Failed("late", 503, "the engine is shut down")]


# ---- requests, run synchronously ----


def test_max_tokens_ends_with_length(engine):
    events = engine.generate_sync([gen("a", max_tokens=4)])
    assert len(outputs(events)["a", 0]) == 4
    final = finals(events)["a", 0]
    assert (final.finish_reason, final.stop_reason, final.num_prompt_tokens) == ("length", None, len(PROMPT))
    assert final.num_cached_tokens == 0


def test_greedy_is_deterministic_and_batch_independent(engine):
    alone = outputs(engine.generate_sync([gen("a", max_tokens=8, temperature=0.0)]))["a", 0]
    together = engine.generate_sync(
        [
            gen("x", prompt=(1, 2, 3), max_tokens=8),
            gen("a", max_tokens=8, temperature=0.0),
            gen("y", max_tokens=3),
        ]
    )
    assert outputs(together)["a", 0] == alone


def test_stop_token_ids_stop_with_the_id_as_reason(engine):
    greedy = outputs(engine.generate_sync([gen("a", max_tokens=6, temperature=0.0)]))["a", 0]
    stop = greedy[3]
    events = engine.generate_sync([gen("b", max_tokens=6, temperature=0.0, stop_token_ids=(stop,))])
    tokens = outputs(events)["b", 0]
    assert tokens == greedy[: greedy.index(stop) + 1]  # the stop token is the last one
    assert (finals(events)["b", 0].finish_reason, finals(events)["b", 0].stop_reason) == ("stop", stop)


def test_eos_stops_unless_ignored_and_min_tokens_holds_it_back(engine):
    greedy = outputs(engine.generate_sync([gen("a", max_tokens=6, temperature=0.0)]))["a", 0]
    eos = greedy[2]
    # pretend that token is EOS, as a model's generation_config would declare it
    engine.core.eos_token_ids = frozenset({eos})
    try:
        events = engine.generate_sync([gen("b", max_tokens=6, temperature=0.0, ignore_eos=False)])
        assert outputs(events)["b", 0] == greedy[: greedy.index(eos) + 1]
        assert (finals(events)["b", 0].finish_reason, finals(events)["b", 0].stop_reason) == ("stop", None)
        ignored = engine.generate_sync([gen("c", max_tokens=6, temperature=0.0, ignore_eos=True)])
        assert outputs(ignored)["c", 0] == greedy
        held = engine.generate_sync([gen("d", max_tokens=6, temperature=0.0, ignore_eos=False, min_tokens=6)])
        assert eos not in outputs(held)["d", 0]
        assert finals(held)["d", 0].finish_reason == "length"
    finally:
        engine.core.eos_token_ids = engine.tokenizer.eos_token_ids


def test_n_samples_have_distinct_indices_and_share_the_prompt(engine):
    events = engine.generate_sync([gen("a", n=3, max_tokens=5, temperature=1.0, seed=7)])
    out = outputs(events)
    assert sorted(out) == [("a", 0), ("a", 1), ("a", 2)]
    assert all(len(tokens) == 5 for tokens in out.values())
    assert len({tuple(tokens) for tokens in out.values()}) > 1
    assert {k: e.finish_reason for k, e in finals(events).items()} == dict.fromkeys(out, "length")


def test_seeded_sampling_is_reproducible_whatever_else_runs(engine):
    request = gen("s", max_tokens=12, temperature=1.0, seed=1234)
    alone = outputs(engine.generate_sync([request]))["s", 0]
    busy = engine.generate_sync(
        [gen("o1", max_tokens=12, temperature=1.0), request, gen("o2", prompt=(9, 9, 9), n=2, max_tokens=12)]
    )
    assert outputs(busy)["s", 0] == alone
    other_seed = outputs(engine.generate_sync([gen("t", max_tokens=12, temperature=1.0, seed=99)]))["t", 0]
    assert other_seed != alone


def test_abort_drops_the_request(engine):
    assert engine.step_sync([gen("a", max_tokens=50), gen("b", max_tokens=50)])
    engine.step_sync()
    events = engine.step_sync([Abort("a")])
    assert {e.request_id for e in events} == {"b"}
    engine.step_sync([Abort("b")])
    assert not engine.core.has_work
    assert engine.step_sync() == []


def test_abort_of_one_index_drops_only_that_sample(engine):
    engine.step_sync([gen("a", n=3, max_tokens=4)])
    events = engine.step_sync([Abort("a", index=1)])
    assert sorted(e.index for e in events) == [0, 2]
    rest = engine.generate_sync([])
    assert sorted(k[1] for k in finals(rest)) == [0, 2]


def test_abort_before_the_prefill_and_of_unknown_ids_is_harmless(engine):
    events = engine.generate_sync([gen("a", n=2, max_tokens=3), Abort("a", index=0), Abort("nope")])
    assert sorted(outputs(events)) == [("a", 1)]
    assert engine.generate_sync([gen("b", max_tokens=3), Abort("b")]) == []


def test_logprobs_and_prompt_logprobs(engine):
    events = engine.generate_sync([gen("a", max_tokens=3, temperature=0.0, logprobs=2, prompt_logprobs=1)])
    tokens = [e for e in events if isinstance(e, Tokens)]
    first = tokens[0]
    assert len(first.prompt_logprobs) == len(PROMPT) and first.prompt_logprobs[0] is None
    assert [entry.token_id for entry in first.prompt_logprobs[1:]] == list(PROMPT[1:])
    assert all(len(entry.top) == 1 for entry in first.prompt_logprobs[1:])
    assert all(e.prompt_logprobs is None for e in tokens[1:])
    for event in tokens:
        (chosen,) = event.logprobs
        assert chosen.token_id == event.token_ids[0]
        assert chosen.rank == 1  # greedy picks the best token
        assert len(chosen.top) == 2 and chosen.top[0] == (chosen.token_id, chosen.logprob)
    assert tokens[-1].cumulative_logprob == pytest.approx(
        sum(e.logprobs[0].logprob for e in tokens), abs=1e-4
    )


def test_prompt_logprobs_of_a_long_prompt_are_scored_in_chunks(engine, monkeypatch):
    prompt = [(7 * i) % 300 for i in range(40)]
    request = gen("a", prompt=prompt, max_tokens=1, prompt_logprobs=3)
    (whole,) = engine.generate_sync([request])
    monkeypatch.setattr("engine.core._PROMPT_LOGPROBS_CHUNK", 6)
    (chunked,) = engine.generate_sync([request])
    assert len(chunked.prompt_logprobs) == len(prompt)
    assert [e.token_id for e in chunked.prompt_logprobs[1:]] == prompt[1:]
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:], strict=True):
        assert (a.token_id, a.rank, [t for t, _ in a.top]) == (b.token_id, b.rank, [t for t, _ in b.top])
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_max_tokens_zero_returns_only_prompt_logprobs(engine):
    events = engine.generate_sync([gen("a", max_tokens=0, prompt_logprobs=0)])
    assert len(events) == 1
    (event,) = events
    assert event.token_ids == () and event.finish_reason == "length"
    assert len(event.prompt_logprobs) == len(PROMPT)


def test_context_window_caps_generation(tiny_llama):
    engine = new_engine(tiny_llama, max_model_len=10)
    events = engine.generate_sync([gen("a", max_tokens=50)])
    assert len(outputs(events)["a", 0]) == 10 - len(PROMPT)
    assert finals(events)["a", 0].finish_reason == "length"
    (failed,) = engine.generate_sync([gen("b", prompt=range(10))])
    assert failed.status == 400 and "maximum context length is 10 tokens" in failed.message


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n": 3, "best_of": 2}, "best_of must be at least n=3"),
        ({"use_beam_search": True, "n": 10**4}, "n=10000 exceeds the engine's max_num_seqs"),
        ({"logit_bias": {10**6: 1.0}}, "logit_bias holds token ids outside the vocabulary"),
        ({"allowed_token_ids": (-1,)}, "allowed_token_ids"),
        ({"stop_token_ids": (10**6,)}, "stop_token_ids"),
    ],
)
def test_requests_the_engine_cannot_serve_fail_with_400(engine, params, message):
    (failed,) = engine.generate_sync([gen("a", **params)])
    assert isinstance(failed, Failed) and failed.status == 400 and message in failed.message


def test_bad_prompts_and_duplicate_ids_fail_with_400(engine):
    assert engine.generate_sync([gen("a", prompt=())])[0].message == "the prompt is empty"
    assert "prompt holds token ids outside" in engine.generate_sync([gen("b", prompt=(1, 10**6))])[0].message
    events = engine.step_sync([gen("c", max_tokens=3), gen("c", max_tokens=3)])
    assert Failed("c", 400, "request id 'c' is already running") in events
    engine.generate_sync([])
    (failed,) = engine.generate_sync([Encode("e", (1, 2), PoolingParams())])
    assert failed.status == 400


def test_waiting_requests_respect_max_num_seqs_and_priority(tiny_llama):
    engine = new_engine(tiny_llama, max_num_seqs=2)
    first = engine.step_sync(
        [gen("a", max_tokens=2), gen("b", max_tokens=2), gen("urgent", max_tokens=2, priority=-1)]
    )
    assert sorted(e.request_id for e in first) == ["a", "urgent"]
    rest = engine.generate_sync([])
    assert {e.request_id for e in rest} == {"a", "b", "urgent"}
    (failed,) = engine.generate_sync([gen("wide", n=3)])
    assert failed.status == 400 and "max_num_seqs" in failed.message


def test_engine_exposes_what_the_server_needs(engine, tiny_llama):
    assert engine.model_name == "tiny-llama"
    assert engine.root == str(tiny_llama.resolve())
    assert engine.tasks == {"generate"}
    assert engine.max_model_len == 256
    assert engine.vocab_size == engine.tokenizer.vocab_size
    assert engine.generation_defaults == {}
    assert engine.healthy


def test_offline_llm_generates_text_for_each_prompt(engine):
    llm = LLM(engine=engine)
    params = SamplingParams(max_tokens=3, n=2, ignore_eos=True, logprobs=1, seed=3)
    results = llm.generate(["Hello world", [5, 6, 7]], params)
    assert [r.prompt_token_ids for r in results] == [engine.tokenizer.encode("Hello world"), [5, 6, 7]]
    for result in results:
        assert [c.index for c in result.outputs] == [0, 1]
        for completion in result.outputs:
            assert len(completion.token_ids) == 3 and completion.finish_reason == "length"
            assert completion.text == engine.tokenizer.decode(completion.token_ids)
            assert [lp.token_id for lp in completion.logprobs] == completion.token_ids
    with pytest.raises(GenerationFailed, match="best_of must be at least n"):
        llm.generate(["x"], SamplingParams(n=2, best_of=1))
