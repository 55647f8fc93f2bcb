"""Prefix-cache-aware replica choice (sansllm.prefix_routing): shared prefixes stay on one replica,
load still wins past the imbalance bound, and a replica that went away is forgotten."""

from __future__ import annotations

import random

from sansllm.prefix_routing import PrefixAffinity, prompt_text

SYSTEM = "You are a careful assistant for the finance team. " * 40  # ~2000 characters, shared


def chat(user: str, system: str = SYSTEM) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def test_requests_sharing_a_long_system_prompt_land_on_one_replica():
    router = PrefixAffinity(imbalance=4)
    loads = {"a": 0, "b": 0, "c": 0}
    chosen = []
    for i in range(12):
        replica = router.choose(router.keys(prompt_text(chat(f"question {i}"))), loads)
        loads[replica] += 1 if i % 3 else 0  # some finish at once, others keep the replica busy
        chosen.append(replica)
    assert len(set(chosen[: 4 + 1])) == 1  # held while its extra load stays within the bound


def test_load_wins_past_the_imbalance_bound():
    router = PrefixAffinity(imbalance=2)
    keys = router.keys(prompt_text(chat("q")))
    assert router.choose(keys, {"a": 0, "b": 0}) == "a"
    assert router.choose(keys, {"a": 2, "b": 0}) == "a"  # a hit is worth 2 queued requests
    assert router.choose(keys, {"a": 3, "b": 0}) == "b"  # not 3: the least loaded takes it
    assert router.choose(keys, {"a": 3, "b": 1}) == "b"  # and now holds the prefix


def test_unrelated_prompts_spread_by_load():
    router = PrefixAffinity()
    loads = {"a": 0, "b": 0}
    rng = random.Random(0)
    for i in range(20):
        text = "".join(rng.choice("abcdefgh ") for _ in range(600)) + str(i)
        loads[router.choose(router.keys(text), loads)] += 1
    assert abs(loads["a"] - loads["b"]) <= 1


def test_the_longest_shared_prefix_wins():
    router = PrefixAffinity(imbalance=2)
    base = "x" * 1024
    router.choose(router.keys(base + "y" * 1024), {"a": 0, "b": 5})  # a serves base + y...
    router.choose(router.keys(base + "z" * 1024), {"a": 5, "b": 0})  # b serves base + z (a is busy)
    assert router.choose(router.keys(base + "y" * 1024 + "more"), {"a": 0, "b": 0}) == "a"
    assert router.choose(router.keys(base + "z" * 1024 + "more"), {"a": 0, "b": 0}) == "b"


def test_a_replica_that_went_away_is_forgotten():
    router = PrefixAffinity()
    keys = router.keys(prompt_text(chat("q")))
    assert router.choose(keys, {"a": 0, "b": 1}) == "a"
    router.forget("a")
    assert router.choose(keys, {"b": 1, "c": 0}) == "c"  # no memory of a; least loaded


def test_short_prompts_have_no_keys_and_memory_is_bounded():
    router = PrefixAffinity(chunk_chars=8, max_entries=5)
    assert router.keys("short") == []
    assert router.choose([], {"a": 1, "b": 0}) == "b"
    router.choose(router.keys("0123456789abcdefghijklmnopqrstuvwxyz0123456789"), {"a": 0})
    assert len(router._owner) == 5


def test_prompt_text_reads_chats_parts_and_completions():
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]}
    assert prompt_text(parts) == "\x00user\x00hi"
    assert prompt_text({"prompt": "once upon"}) == "once upon"
    assert prompt_text({"prompt": ["first", "second"]}) == "first"
    assert prompt_text({"prompt": [1, 2, 3]}) == ""
    assert prompt_text({"input": "embed me"}) == ""
    assert prompt_text(chat("a")) != prompt_text(chat("a", system="other")) and prompt_text(chat("a")).startswith(
        "\x00system\x00You are"
    )
