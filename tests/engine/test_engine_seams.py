"""The engine's seams: prefix-cache salts, prefill-only work on decoders, several models on one thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from engine.engine import Engine, EngineConfig, EngineThread
from engine.kv_cache import hash_block
from protocol.engine_api import Encode, Failed, Generate, Pooled, PoolingParams, SamplingParams, Tokens
from tests.engine.test_engine import Recorder

PROMPT = tuple(range(5, 5 + 40))  # 40 tokens: two full blocks of 16 can be cached


def decoder(folder: Path, **config) -> Engine:
    return Engine(EngineConfig(model=str(folder), progress=False, **config))


def generate(request_id: str, salt: str | None = None, prompt=PROMPT) -> Generate:
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    return Generate(request_id, prompt, params, cache_salt=salt)


def cached_tokens(engine: Engine, command: Generate) -> int:
    (first, *_) = [e for e in engine.generate_sync([command]) if isinstance(e, Tokens)]
    return first.num_cached_tokens


def test_block_keys_are_sha256_chains_that_the_salt_separates():
    tokens = list(range(16))
    first = hash_block(None, tokens)
    assert isinstance(first, bytes) and len(first) == 32
    assert hash_block(None, tokens) == first
    assert hash_block(None, tokens, "tenant-a") != first != hash_block(None, tokens, "tenant-b")
    assert hash_block(first, tokens) != hash_block(hash_block(None, tokens, "tenant-a"), tokens)


def test_requests_with_different_cache_salts_never_share_blocks(tiny_llama):
    engine = decoder(tiny_llama)
    assert cached_tokens(engine, generate("a", salt="alice")) == 0
    assert cached_tokens(engine, generate("b", salt="bob")) == 0  # same prompt, other salt: a miss
    assert cached_tokens(engine, generate("c")) == 0  # no salt is a salt of its own
    assert cached_tokens(engine, generate("d", salt="alice")) == 32  # the same salt hits
    assert cached_tokens(engine, generate("e")) == 32


def test_a_decoder_converted_to_embeddings_pools_its_last_token(tiny_llama):
    engine = decoder(tiny_llama, convert="embed")
    assert engine.tasks == {"embed"} and engine.pooling.hidden_size == 64
    prompts = [PROMPT[:7], PROMPT, PROMPT[:1]]
    events = engine.generate_sync(
        [Encode(f"e{i}", p, PoolingParams(task="embed")) for i, p in enumerate(prompts)]
        + [Encode("raw", PROMPT, PoolingParams(task="embed", normalize=False, dimensions=8))]
    )
    pooled = {e.request_id: e for e in events if isinstance(e, Pooled)}
    reference = AutoModel.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            last = reference(torch.tensor([prompt])).last_hidden_state[0, -1]
        expected = torch.nn.functional.normalize(last, dim=0)
        got = torch.tensor(pooled[f"e{i}"].data)
        assert pooled[f"e{i}"].num_prompt_tokens == len(prompt)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        last = reference(torch.tensor([PROMPT])).last_hidden_state[0, -1]
    torch.testing.assert_close(torch.tensor(pooled["raw"].data), last[:8], atol=1e-4, rtol=1e-4)


def test_each_model_refuses_the_work_it_cannot_do(tiny_llama):
    generator, embedder = decoder(tiny_llama), decoder(tiny_llama, convert="embed")
    (refused,) = generator.generate_sync([Encode("e", PROMPT, PoolingParams())])
    assert isinstance(refused, Failed) and refused.status == 400 and "does not serve embeddings" in refused.message
    (refused,) = embedder.generate_sync([generate("g")])
    assert isinstance(refused, Failed) and refused.status == 400 and "does not generate" in refused.message
    (refused,) = embedder.generate_sync([Encode("c", PROMPT, PoolingParams(task="classify"))])
    assert isinstance(refused, Failed) and "'classify'" in refused.message
    too_long = tuple([5] * (embedder.max_model_len + 1))
    (refused,) = embedder.generate_sync([Encode("long", too_long, PoolingParams())])
    assert isinstance(refused, Failed) and "maximum context length" in refused.message


def test_prompt_scoring_without_generation_is_prefill_only_work(tiny_llama):
    engine = decoder(tiny_llama)
    params = SamplingParams(max_tokens=0, prompt_logprobs=1)
    (event,) = engine.generate_sync([Generate("p", PROMPT[:10], params)])
    assert isinstance(event, Tokens) and event.index == 0 and event.token_ids == ()
    assert event.finish_reason == "length" and len(event.prompt_logprobs) == 10
    assert not engine.core.has_work and engine.core.kv.pool.usage() == 0.0


def test_two_models_share_one_engine_thread(tiny_llama):
    thread = EngineThread()
    chat = Engine(EngineConfig(model=str(tiny_llama), progress=False), thread=thread)
    embed = Engine(EngineConfig(model=str(tiny_llama), progress=False, convert="embed"), thread=thread)
    chat_events, embed_events = Recorder(), Recorder()
    chat.start(chat_events)
    embed.start(embed_events)
    try:
        chat.submit([generate("g")])
        embed.submit([Encode("e", PROMPT, PoolingParams())])
        chat_calls = chat_events.until_finished({"g"})
        _, (pooled,) = embed_events.calls.get(timeout=30)
        assert isinstance(pooled, Pooled) and pooled.request_id == "e"
        assert all(e.request_id == "g" for events in chat_calls for e in events)
    finally:
        chat.shutdown()
        assert embed.healthy and thread.worker._thread.is_alive()  # the other model keeps serving
        embed.submit([Encode("after", PROMPT, PoolingParams())])
        _, (pooled,) = embed_events.calls.get(timeout=30)
        assert isinstance(pooled, Pooled) and pooled.request_id == "after"
        embed.shutdown()
    with pytest.raises(RuntimeError, match="already serving"):
        Engine(EngineConfig(model=str(tiny_llama), progress=False), thread=thread)
    thread.worker._thread.join(timeout=30)
    assert not thread.worker._thread.is_alive()
    chat.submit([generate("late")])  # a stopped engine refuses at once
    _, (late,) = chat_events.calls.get(timeout=30)
    assert isinstance(late, Failed) and late.status == 503


def test_pooling_models_default_to_float32_where_generation_takes_bfloat16(tiny_llama, monkeypatch):
    monkeypatch.setattr("engine.loader.cpu_has_native_bf16", lambda *args: True)
    assert decoder(tiny_llama, convert="embed").core.dtype == torch.float32
    assert decoder(tiny_llama).core.dtype == torch.bfloat16
