"""Continuous batching on the paged cache, seen through the engine's events and stats (tiny random model).

The SmolLM2 acceptance versions of these live in test_smollm2_batching.py; these cover the edges
cheaply: n samples, prompt logprobs with the prefix cache, seeded sampling across preemption,
priorities, cache sizing and the stats the metrics endpoint reads.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from engine.attention import PagedKVCache
from engine.engine import Engine, EngineConfig, parse_memory
from engine.loader import LoadedModel, load_model
from engine.model_files import resolve_model
from protocol.engine_api import Abort, Generate, SamplingParams, Tokens

PROMPT = tuple((7 * i + 3) % 300 for i in range(40))  # 2 full blocks of 16, and 8 more tokens


@pytest.fixture(scope="module")
def loaded(tiny_llama: Path) -> LoadedModel:
    return load_model(resolve_model(str(tiny_llama)), progress=False)


def new_engine(loaded: LoadedModel, **config) -> Engine:
    return Engine(EngineConfig(model="tiny", progress=False, **config), loaded=loaded)


def gen(request_id: str, prompt=PROMPT, priority: int = 0, **params) -> Generate:
    params.setdefault("ignore_eos", True)
    params.setdefault("temperature", 0.0)
    return Generate(request_id, tuple(prompt), SamplingParams(**params), priority)


def outputs(events) -> dict[tuple[str, int], list[int]]:
    out: dict[tuple[str, int], list[int]] = defaultdict(list)
    for event in events:
        assert isinstance(event, Tokens), event
        out[event.request_id, event.index].extend(event.token_ids)
    return dict(out)


def prompt_of(i: int, length: int) -> tuple[int, ...]:
    return tuple((11 * i + 5 * j) % 300 for j in range(length))


def test_n_samples_compute_their_shared_prompt_once(loaded):
    engine = new_engine(loaded)
    events = engine.generate_sync([gen("a", n=3, max_tokens=4, temperature=1.0, seed=5)])
    out = outputs(events)
    assert sorted(out) == [("a", 0), ("a", 1), ("a", 2)]
    stats = engine.stats()
    # samples 1 and 2 attach to the 2 full blocks sample 0 fills in the same step
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (3 * len(PROMPT), 2 * 32)
    # the request itself found nothing cached
    assert all(e.num_cached_tokens == 0 for e in events)
    assert stats.prompt_tokens_total == len(PROMPT) and stats.generation_tokens_total == 12


def test_seeded_samples_survive_preemption_unchanged(loaded):
    params = dict(temperature=1.0, max_tokens=40)
    requests = [gen(f"r{i}", prompt_of(i, 20), seed=i, **params) for i in range(6)]
    alone = {}
    for request in requests:
        alone.update(outputs(new_engine(loaded).generate_sync([request])))
    small = new_engine(loaded, num_kv_blocks=10)  # 160 tokens for six requests of 60
    assert small.max_model_len == 160  # the model's 256 do not fit: lowered to what the cache holds
    together = outputs(small.generate_sync(requests))
    assert small.stats().num_preemptions > 0
    assert together == alone


def test_prompt_logprobs_are_complete_even_when_the_prompt_is_cached(loaded):
    engine = new_engine(loaded)
    first = engine.generate_sync([gen("a", max_tokens=2)])
    assert engine.generate_sync([gen("b", max_tokens=2)])[0].num_cached_tokens == 32  # cached
    events = engine.generate_sync([gen("c", n=2, max_tokens=2, prompt_logprobs=1)])
    firsts = [e for e in events if e.token_ids and e.prompt_logprobs is not None]
    assert sorted(e.index for e in firsts) == [0, 1]  # each sample's first event carries them
    for event in firsts:
        assert len(event.prompt_logprobs) == len(PROMPT)
        assert [entry.token_id for entry in event.prompt_logprobs[1:]] == list(PROMPT[1:])
    # scoring needs every position computed, so the cache was not read; the tokens are the same
    assert outputs(events)["c", 0] == outputs(first)["a", 0]


def test_max_tokens_zero_with_n_samples_scores_the_prompt_once(loaded):
    engine = new_engine(loaded)
    events = engine.generate_sync([gen("a", n=2, max_tokens=0, prompt_logprobs=0)])
    assert sorted(e.index for e in events) == [0, 1]
    assert all(e.token_ids == () and e.finish_reason == "length" for e in events)
    assert all(len(e.prompt_logprobs) == len(PROMPT) for e in events)
    assert engine.stats().prefix_cache_queries == len(PROMPT)  # one hidden scoring sequence
    # without prompt logprobs there is nothing to compute: answered at once
    assert [e.index for e in engine.step_sync([gen("b", n=2, max_tokens=0)])] == [0, 1]


def test_decodes_keep_running_while_a_long_prompt_is_prefilled_in_chunks(loaded):
    engine = new_engine(loaded, max_num_batched_tokens=16)
    engine.step_sync([gen("short", prompt=(1, 2, 3), max_tokens=20)])
    long_prompt = prompt_of(1, 100)
    steps = [engine.step_sync([gen("long", prompt=long_prompt, max_tokens=3)])]
    while not any(e.request_id == "long" for e in steps[-1]):
        steps.append(engine.step_sync())
    # every step of the long prefill also decoded the short request
    assert all([e.request_id for e in events] == ["short"] for events in steps[:-1])
    assert len(steps) == -(-100 // 15)  # the short decode takes 1 token of each 16-token budget
    rest = engine.generate_sync([])
    whole = new_engine(loaded).generate_sync([gen("long", prompt=long_prompt, max_tokens=3)])
    chunked = outputs([e for events in steps for e in events] + rest)
    assert chunked["long", 0] == outputs(whole)["long", 0]


def test_higher_priority_waits_less_but_never_preempts(loaded):
    engine = new_engine(loaded, max_num_seqs=1)
    engine.step_sync([gen("running", max_tokens=3)])
    engine.step_sync([gen("low", max_tokens=1, priority=5), gen("high", max_tokens=1, priority=-5)])
    order = [e.request_id for e in engine.generate_sync([])]
    assert order == ["running", "high", "low"]


def test_aborting_a_waiting_or_running_sample_frees_its_blocks(loaded):
    engine = new_engine(loaded, max_num_seqs=2, enable_prefix_caching=False)
    pool = engine.core.kv.pool
    engine.step_sync([gen("x", max_tokens=50), gen("a", n=2, max_tokens=50)])  # a's sample 1 waits
    assert engine.stats().num_waiting == 1
    assert pool.num_free_blocks == pool.num_blocks - 2 * 3  # 41 tokens: 3 blocks each
    engine.step_sync([Abort("a", index=0)])  # sample 1 takes the freed seat in the same step
    assert engine.stats().num_waiting == 0 and engine.stats().num_running == 2
    assert pool.num_free_blocks == pool.num_blocks - 2 * 3
    engine.step_sync([Abort("a")])
    assert pool.num_free_blocks == pool.num_blocks - 3  # x's blocks only
    engine.step_sync([Abort("x")])
    assert pool.num_free_blocks == pool.num_blocks and not engine.core.has_work


def test_stats_follow_the_load(loaded):
    engine = new_engine(loaded, max_num_seqs=2, num_kv_blocks=64)
    assert engine.stats().num_running == engine.stats().num_waiting == 0
    engine.step_sync([gen(f"r{i}", prompt=prompt_of(i, 33), max_tokens=5) for i in range(3)])
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (2, 1)
    assert stats.kv_cache_usage == pytest.approx(2 * 3 / 64)  # 34 tokens: 3 blocks each
    assert stats.generation_tokens_total == 2 and stats.prompt_tokens_total == 2 * 33
    engine.generate_sync([])
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert stats.generation_tokens_total == 15 and stats.prompt_tokens_total == 99


def test_kv_cache_memory_sizes_the_cache(loaded):
    per_block = PagedKVCache.bytes_per_block(loaded.config, 16, loaded.model.lm_head.weight.dtype)
    engine = new_engine(loaded, kv_cache_memory="1MiB")
    assert engine.core.kv.pool.num_blocks == (1 << 20) // per_block
    layer_keys, _ = engine.core.kv_cache.layers[0]
    assert tuple(layer_keys.shape) == (
        (1 << 20) // per_block,
        16,
        loaded.config.num_key_value_heads,
        loaded.config.head_dim,
    )
    # more memory than max_num_seqs sequences of max_model_len tokens can use is not allocated
    assert (
        new_engine(loaded, kv_cache_memory=1 << 30, max_num_seqs=2).core.kv.pool.num_blocks == 2 * 256 // 16
    )
    with pytest.raises(ValueError, match="larger than the KV cache holds"):
        new_engine(loaded, num_kv_blocks=4, max_model_len=100)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GiB", 1 << 30), ("512M", 512 << 20), ("2G", 2 << 30), ("1.5 GB", 3 << 29), ("4096", 4096), (7, 7)],
)
def test_memory_sizes_read_like_the_cli(text, size):
    assert parse_memory(text) == size


def test_unreadable_memory_size_is_refused():
    with pytest.raises(ValueError, match="memory size"):
        parse_memory("lots")
