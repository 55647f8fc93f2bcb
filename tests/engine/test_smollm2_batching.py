"""Acceptance tests of continuous batching over the paged KV cache, with the real SmolLM2-135M.

Reference: transformers loading the same GGUF in float32. Greedy equality is checked by teacher
forcing: one transformers forward over prompt + our output gives its logits at every position,
and greedy decoding agrees exactly when its argmax at each position is the token we produced
(so 20 prompts cost 20 forwards instead of 320 decode steps). The same forward gives the prompt
logprobs and the top-two gap used to recognise near ties.

Several engines share one set of loaded weights (`Engine(config, loaded=...)`): each gets its own
KV cache and scheduler settings, at the cost of a cache allocation only.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM

import kernels
from engine.engine import Engine, EngineConfig
from engine.loader import LoadedModel, load_model
from engine.model_files import DEFAULT_MODEL, resolve_model
from protocol.engine_api import Abort, Generate, SamplingParams, Tokens

MAX_TOKENS = 16
LOGPROB_ATOL = 2e-3  # float32 logits of magnitude ~40 after 30 layers differ by ~1e-4 (summation order)
NEAR_TIE = 1e-3  # top-two logprob gap under which a batched run may legitimately pick the other token

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet goldfish.",
    "Explain photosynthesis in one sentence.",
    "What is the largest planet in our solar system?",
    "List two benefits of exercise.",
    "What does CPU stand for?",
    "Write a short greeting for a birthday card.",
    "Is a tomato a fruit or a vegetable?",
    "What language is spoken in Brazil?",
    "Describe the color blue to someone who cannot see.",
    "What is the square root of 81?",
    "Tell me a fun fact about octopuses.",
]
SYSTEM = (
    "You are a meticulous assistant for a public library. You answer questions about opening hours, "
    "borrowing rules and events. Opening hours are nine to five on weekdays and ten to two on "
    "Saturdays; the library is closed on Sundays. Members may borrow up to ten items for three weeks. "
    "Keep every answer short and polite."
)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    # One intra-op thread while this module runs: on a 2-core machine shared with other test runs,
    # two OpenMP threads wait on each other at every matmul (steps measured up to 10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(resolve_model(DEFAULT_MODEL), dtype="float32", progress=False)
    torch.set_num_threads(threads)


def new_engine(loaded: LoadedModel, **config) -> Engine:
    config.setdefault("max_model_len", 1024)
    config.setdefault("kv_cache_memory", "128MiB")
    return Engine(EngineConfig(model=DEFAULT_MODEL, dtype="float32", progress=False, **config), loaded=loaded)


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Engine:
    return new_engine(loaded)


@pytest.fixture(scope="module")
def prompts(loaded: LoadedModel) -> list[list[int]]:
    return [chat(loaded, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def alone(engine: Engine, prompts) -> list[dict]:
    """Each prompt run on its own (greedy, prompt logprobs), with its generated tokens and logprobs."""
    results = []
    for ids in prompts:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, prompt_logprobs=0)
        events = engine.generate_sync([Generate("alone", tuple(ids), params)])
        results.append(
            {
                "tokens": [t for e in events for t in e.token_ids],
                "logprobs": [lp.logprob for e in events for lp in e.logprobs],
                "prompt_logprobs": events[0].prompt_logprobs,
            }
        )
    return results


@pytest.fixture(scope="module")
def hf_logprobs(loaded: LoadedModel, prompts, alone) -> list[torch.Tensor]:
    """transformers' log-softmax at every position of prompt + our greedy output, per prompt."""
    source = resolve_model(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.path.name, dtype=torch.float32
    )
    out = []
    with torch.inference_mode():
        for ids, ours in zip(prompts, alone, strict=True):
            logits = model(torch.tensor([ids + ours["tokens"]])).logits[0]
            out.append(torch.log_softmax(logits.float(), dim=-1))
    return out


def chat(loaded: LoadedModel, messages) -> list[int]:
    rendered = loaded.tokenizer.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def greedy(max_tokens: int = MAX_TOKENS, **params) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **params)


def outputs(events) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for event in events:
        assert isinstance(event, Tokens), event
        out[event.request_id].extend(event.token_ids)
    return dict(out)


def run_together(engine: Engine, prompts, params: SamplingParams | None = None) -> list[list[int]]:
    events = engine.generate_sync(
        [Generate(f"r{i}", tuple(ids), params or greedy()) for i, ids in enumerate(prompts)]
    )
    out = outputs(events)
    return [out[f"r{i}"] for i in range(len(prompts))]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top_two_gap(logprobs: torch.Tensor) -> float:
    best = logprobs.topk(2).values
    return float(best[0] - best[1])


# ---- against transformers ----


def test_greedy_one_at_a_time_is_token_identical_to_transformers(prompts, alone, hf_logprobs):
    for ids, ours, reference in zip(prompts, alone, hf_logprobs, strict=True):
        tokens = ours["tokens"]
        assert tokens, "every prompt produces at least one token"
        # position len(ids) - 1 + t predicts generated token t
        rows = reference[len(ids) - 1 : len(ids) - 1 + len(tokens)]
        assert rows.argmax(dim=-1).tolist() == tokens
        expected = rows.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert ours["logprobs"] == pytest.approx(expected.tolist(), abs=LOGPROB_ATOL)


def test_prompt_logprobs_match_transformers(prompts, alone, hf_logprobs):
    worst = 0.0
    for ids, ours, reference in zip(prompts, alone, hf_logprobs, strict=True):
        entries = ours["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        assert [e.token_id for e in entries[1:]] == ids[1:]
        expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        actual = torch.tensor([e.logprob for e in entries[1:]])
        worst = max(worst, float((actual - expected).abs().max()))
    print(f"\nlargest prompt logprob difference from transformers: {worst:.2e} (tolerance {LOGPROB_ATOL})")
    assert worst <= LOGPROB_ATOL


def test_one_continuous_batch_diverges_only_at_near_ties(engine, prompts, alone, hf_logprobs):
    together = run_together(engine, prompts)
    divergences = []
    for i, (tokens, ours, reference) in enumerate(zip(together, alone, hf_logprobs, strict=True)):
        at = first_difference(tokens, ours["tokens"])
        if at is None:
            continue
        gap = top_two_gap(reference[len(prompts[i]) - 1 + at])
        divergences.append((i, at, gap))
    print(f"\ndivergences from the one-at-a-time run (prompt, position, HF top-two gap): {divergences}")
    assert all(gap < NEAR_TIE for _, _, gap in divergences)


# ---- paged cache behaviour ----


def test_too_small_cache_preempts_yet_every_request_completes_unchanged(loaded, prompts, alone):
    # 9 blocks of 16 tokens for 8 requests that need 3 blocks for their prompt and 4 by their end
    small = new_engine(loaded, num_kv_blocks=9, max_model_len=144)
    together = run_together(small, prompts[:8])
    stats = small.stats()
    print(f"\npreemptions with 9 KV blocks for 8 requests: {stats.num_preemptions}")
    assert stats.num_preemptions > 0
    assert together == [a["tokens"] for a in alone[:8]]
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_abort_frees_the_running_request_blocks_in_the_same_step(engine, prompts):
    kv = engine.core.kv
    a, b = "a\x000", "b\x000"  # the scheduled sequences: sample 0 of each request
    engine.step_sync(
        [Generate("a", tuple(prompts[0]), greedy(200)), Generate("b", tuple(prompts[1]), greedy(200))]
    )
    engine.step_sync()
    only_a = set(kv.block_ids(a)) - set(kv.block_ids(b))  # a and b share the chat template's first block
    assert only_a
    free_before = kv.pool.num_free_blocks
    events = engine.step_sync([Abort("a")])
    assert {e.request_id for e in events} == {"b"}
    assert not kv.has(a)
    # only b holds blocks now (it may have taken one more for its new token in the same step)
    assert kv.pool.num_free_blocks == kv.pool.num_blocks - len(kv.block_ids(b))
    assert kv.pool.num_free_blocks >= free_before + len(only_a) - 1
    engine.step_sync([Abort("b")])
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    assert not engine.core.has_work


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(loaded, engine):
    first = chat(
        loaded, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When do you open?"}]
    )
    second = chat(
        loaded,
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How long can I keep a book?"}],
    )
    shared = first_difference(first, second)
    engine.generate_sync([Generate("first", tuple(first), greedy())])
    events = engine.generate_sync([Generate("second", tuple(second), greedy())])
    cached = events[-1].num_cached_tokens
    print(f"\nshared prefix {shared} tokens, served from the cache: {cached}")
    assert cached > 0 and cached % 16 == 0 and cached <= shared
    assert cached == shared // 16 * 16
    uncached = new_engine(loaded, enable_prefix_caching=False)
    reference = uncached.generate_sync([Generate("second", tuple(second), greedy())])
    assert reference[-1].num_cached_tokens == 0
    assert outputs(events)["second"] == outputs(reference)["second"]


def test_a_prompt_longer_than_the_token_budget_is_prefilled_in_chunks(loaded, engine):
    ids = chat(
        loaded,
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Are you open on Sunday?"}],
    )
    budget = 32
    assert len(ids) > 2 * budget
    chunked = new_engine(loaded, max_num_batched_tokens=budget, enable_prefix_caching=False)
    steps_without_output = 0
    events = chunked.step_sync([Generate("long", tuple(ids), greedy())])
    while not events:
        steps_without_output += 1
        events = chunked.step_sync()
    events += chunked.generate_sync([])
    assert steps_without_output == -(-len(ids) // budget) - 1
    whole = new_engine(loaded, enable_prefix_caching=False).generate_sync(
        [Generate("long", tuple(ids), greedy())]
    )
    assert outputs(events)["long"] == outputs(whole)["long"]


# ---- batch-invariant mode ----


@pytest.fixture
def invariant_mode():
    yield
    kernels.set_batch_invariant(False)  # the mode is process-wide: do not leak it into other tests


def busy_run(engine: Engine, prompts, probes: list[Generate]) -> tuple[dict[str, list[int]], float]:
    """The probes among 8 other requests of various lengths, arriving over the first steps."""
    others = [
        Generate(
            f"other{i}", tuple(prompts[i + 4]), SamplingParams(temperature=0.7, max_tokens=4 + i, seed=i)
        )
        for i in range(8)
    ]
    start = time.perf_counter()
    events = engine.step_sync(others[:3])
    events += engine.step_sync(probes + others[3:6])
    events += engine.step_sync(others[6:])
    events += engine.generate_sync([])
    elapsed = time.perf_counter() - start
    tokens = sum(len(e.token_ids) for e in events)
    return outputs(events), tokens / elapsed


def test_batch_invariant_mode_gives_the_same_tokens_alone_and_in_a_busy_batch(
    loaded, prompts, invariant_mode
):
    probes = [
        Generate("seeded", tuple(prompts[0]), SamplingParams(temperature=1.0, seed=1234, max_tokens=12)),
        Generate("greedy", tuple(prompts[1]), greedy(12)),
    ]
    timings, same = {}, {}
    for mode in (False, True):
        # fresh engines: a prefix-cache hit would change where the prompt's chunks start
        alone = new_engine(loaded, batch_invariant=mode)
        kernels.set_batch_invariant(mode)
        solo = outputs(alone.generate_sync(probes))
        busy, timings[mode] = busy_run(new_engine(loaded, batch_invariant=mode), prompts, probes)
        same[mode] = busy["seeded"] == solo["seeded"] and busy["greedy"] == solo["greedy"]
    assert same[True]
    print(
        f"\nsame tokens alone and in the busy batch: default mode {same[False]}, batch-invariant {same[True]}"
    )
    print(
        f"\nbusy batch throughput: default {timings[False]:.1f} tok/s, batch-invariant {timings[True]:.1f} tok/s "
        f"(x{timings[True] / timings[False]:.2f}; short run on a shared machine, noisy)"
    )
