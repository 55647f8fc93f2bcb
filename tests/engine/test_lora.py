"""LoRA adapters on the engine: greedy tokens equal transformers + peft for each adapter, alone and
mixed with other adapters and the base model in one batch; slots, memory tiers, prefix-cache keys,
load/unload and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.engine import Engine, EngineConfig
from engine.lora import AdapterError
from protocol.engine_api import (
    AdapterLoaded,
    AdapterUnloaded,
    Failed,
    Generate,
    LoadAdapter,
    SamplingParams,
    Tokens,
    UnloadAdapter,
)
from tests.engine.lora_adapters import build_adapter, reference_greedy

PROMPTS = [(5, 17, 42, 99, 3, 250, 7), (11, 12, 13, 14), (200, 100, 50, 25, 12, 6, 3, 1, 9)]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return {
        "r8": build_adapter(tiny_llama, root / "r8", rank=8, seed=1, base_model=base),
        "r16": build_adapter(tiny_llama, root / "r16", rank=16, seed=2, base_model=base),
        "qv4": build_adapter(tiny_llama, root / "qv4", rank=4, seed=3, targets=("q_proj", "v_proj"), base_model=base),
        "mlp8rs": build_adapter(
            tiny_llama, root / "mlp8rs", rank=8, seed=4, targets=("gate_proj", "up_proj", "down_proj"),
            rslora=True, base_model=base,
        ),
    }


@pytest.fixture(scope="module")
def expected(tiny_llama: Path, adapters) -> dict[tuple[str | None, int], list[int]]:
    """transformers + peft greedy tokens for every (adapter or None, prompt)."""
    return {
        (name, i): reference_greedy(tiny_llama, adapters[name] if name else None, prompt, MAX_TOKENS)
        for name in (None, *adapters)
        for i, prompt in enumerate(PROMPTS)
    }


def lora_engine(tiny_llama: Path, adapters, **config) -> Engine:
    config.setdefault("max_loras", 4)
    config.setdefault("max_lora_rank", 16)
    return Engine(
        EngineConfig(
            model=str(tiny_llama),
            dtype="float32",  # `auto` keeps float32 weights in bfloat16 on some CPUs: compare like with like
            progress=False,
            enable_lora=True,
            lora_modules={name: str(path) for name, path in adapters.items()},
            **config,
        )
    )


def gen(request_id: str, prompt, adapter: str | None, **params) -> Generate:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **params)
    return Generate(request_id, tuple(prompt), params, lora_name=adapter)


def tokens_by_request(events) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for event in events:
        assert not isinstance(event, Failed), event
        if isinstance(event, Tokens):
            out.setdefault(event.request_id, []).extend(event.token_ids)
    return out


def test_each_adapter_alone_equals_transformers_with_peft(tiny_llama, adapters, expected):
    engine = lora_engine(tiny_llama, adapters)
    for name in (None, *adapters):
        for i, prompt in enumerate(PROMPTS):
            got = tokens_by_request(engine.generate_sync([gen("r", prompt, name)]))["r"]
            assert got == expected[name, i], (name, i)


def test_four_adapters_and_the_base_in_one_busy_batch(tiny_llama, adapters, expected):
    engine = lora_engine(tiny_llama, adapters)
    names = [None, *adapters]
    commands = [gen(f"{name}-{i}", prompt, name) for name in names for i, prompt in enumerate(PROMPTS)]
    got = tokens_by_request(engine.generate_sync(commands))
    assert got == {f"{name}-{i}": expected[name, i] for name in names for i in range(len(PROMPTS))}


def test_more_adapters_than_slots_take_turns_and_stay_exact(tiny_llama, adapters, expected):
    engine = lora_engine(tiny_llama, adapters, max_loras=1, max_cpu_loras=2)
    commands = [gen(f"{name}-{i}", prompt, name) for name in adapters for i, prompt in enumerate(PROMPTS)]
    got = tokens_by_request(engine.generate_sync(commands))
    assert got == {f"{name}-{i}": expected[name, i] for name in adapters for i in range(len(PROMPTS))}


def test_the_prefix_cache_keeps_adapters_apart(tiny_llama, adapters, expected):
    engine = lora_engine(tiny_llama, adapters)
    prompt = tuple(range(3, 3 + 40))  # more than two blocks of 16: cacheable
    first = engine.generate_sync([gen("a", prompt, "r8")])
    assert first[0].num_cached_tokens == 0
    again = engine.generate_sync([gen("b", prompt, "r8")])
    assert again[0].num_cached_tokens == 32  # the same adapter shares its blocks
    other = engine.generate_sync([gen("c", prompt, "r16"), gen("d", prompt, None)])
    assert {e.request_id: e.num_cached_tokens for e in other if isinstance(e, Tokens)} == {"c": 0, "d": 0}


def test_load_use_unload_reload(tiny_llama, adapters, expected):
    engine = lora_engine(tiny_llama, {})
    (loaded,) = engine.generate_sync([LoadAdapter("l1", "late", str(adapters["r16"]))])
    assert isinstance(loaded, AdapterLoaded) and loaded.path == str(adapters["r16"])
    assert tokens_by_request(engine.generate_sync([gen("r", PROMPTS[0], "late")]))["r"] == expected["r16", 0]
    (again,) = engine.generate_sync([LoadAdapter("l2", "late", str(adapters["r8"]))])
    assert isinstance(again, Failed) and again.status == 400 and "already been loaded" in again.message
    (unloaded,) = engine.generate_sync([UnloadAdapter("u1", "late")])
    assert isinstance(unloaded, AdapterUnloaded)
    (gone,) = engine.generate_sync([gen("r2", PROMPTS[0], "late")])
    assert isinstance(gone, Failed) and gone.status == 404 and gone.message == "The model `late` does not exist."
    (missing,) = engine.generate_sync([UnloadAdapter("u2", "late")])
    assert isinstance(missing, Failed) and missing.status == 404
    engine.generate_sync([LoadAdapter("l3", "late", str(adapters["r8"]))])  # the name again, other weights
    assert tokens_by_request(engine.generate_sync([gen("r3", PROMPTS[0], "late")]))["r3"] == expected["r8", 0]
    assert engine.lora_adapters == {"late": str(adapters["r8"])}


def test_adapters_that_cannot_be_served_are_refused_with_the_reason(tiny_llama, adapters, tmp_path):
    engine = lora_engine(tiny_llama, {}, max_lora_rank=8)
    cases = {
        "no-folder": (str(tmp_path / "nothing"), "adapter_config.json"),
        "too-big": (str(adapters["r16"]), "above --max-lora-rank 8"),
    }
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapters["r8"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cases["dora"] = (str(dora), "DoRA")
    for name, (path, reason) in cases.items():
        (event,) = engine.generate_sync([LoadAdapter(name, name, path)])
        assert isinstance(event, Failed) and event.status == 400 and reason in event.message, (name, event)
    base = Engine(EngineConfig(model=str(tiny_llama), progress=False))
    (refused,) = base.generate_sync([LoadAdapter("x", "x", str(adapters["r8"]))])
    assert isinstance(refused, Failed) and "--enable-lora" in refused.message
    with pytest.raises(AdapterError, match="above --max-lora-rank 8"):
        lora_engine(tiny_llama, {"big": adapters["r16"]}, max_lora_rank=8)
