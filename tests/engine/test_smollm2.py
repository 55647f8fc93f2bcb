"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers loading the same file.

Both sides dequantize the same GGUF to float32, so they run the same weights; logits agree to
`LOGITS_ATOL` (observed: ~7e-5 on logits of magnitude ~40, from summation order over 30 layers).
Loading transformers' reference takes ~30 s, so one module-scoped fixture serves every test.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.engine import Engine, EngineConfig
from engine.model_files import DEFAULT_MODEL, resolve_model
from engine.offline import LLM
from protocol.engine_api import Generate, SamplingParams, Tokens
from tests.engine.paged import prefill_logits

LOGITS_ATOL = 2e-3
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a color."}],
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model=DEFAULT_MODEL, dtype="float32", progress=False))


@pytest.fixture(scope="module")
def hf_tokenizer():
    source = resolve_model(DEFAULT_MODEL)
    return AutoTokenizer.from_pretrained(source.folder, gguf_file=source.path.name)


@pytest.fixture(scope="module")
def hf_model():
    source = resolve_model(DEFAULT_MODEL)
    return AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.path.name, dtype=torch.float32
    )


def chat_ids(hf_tokenizer, messages) -> list[int]:
    rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(rendered["input_ids"])


def greedy(engine: Engine, ids: list[int], max_tokens: int) -> tuple[list[int], Tokens]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    events = engine.generate_sync([Generate("g", tuple(ids), params)])
    return [t for e in events for t in e.token_ids], events[-1]


def test_answers_the_capital_of_france(engine, hf_tokenizer):
    tokens, last = greedy(engine, chat_ids(hf_tokenizer, PROMPTS[0]), 32)
    assert engine.tokenizer.decode(tokens) == "The capital of France is Paris."
    assert (last.finish_reason, last.stop_reason) == ("stop", None)  # <|im_end|> is EOS
    assert tokens[-1] in engine.tokenizer.eos_token_ids


def test_tokenizer_matches_transformers(engine, hf_tokenizer):
    tok = engine.tokenizer
    assert tok.chat_template == hf_tokenizer.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token_ids == {hf_tokenizer.eos_token_id} == {2}
    assert tok.vocab_size == 49152
    for text in ["Hello world", " <|im_start|>user\nhi<|im_end|> héllo 123 ", "def f(x):\n    return x"]:
        assert tok.encode(text) == hf_tokenizer.encode(text)
        ids = hf_tokenizer.encode(text)
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
        assert tok.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)


def test_greedy_tokens_match_transformers(engine, hf_tokenizer, hf_model):
    for messages in PROMPTS:
        ids = chat_ids(hf_tokenizer, messages)
        ours, _ = greedy(engine, ids, 24)
        with torch.inference_mode():
            theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :]
        assert ours == theirs.tolist()[: len(ours)]
        assert len(ours) == len(theirs) or ours[-1] in engine.tokenizer.eos_token_ids


def test_prompt_logits_match_transformers(engine, hf_tokenizer, hf_model):
    ids = chat_ids(hf_tokenizer, PROMPTS[1])
    ours = prefill_logits(engine.loaded.model, ids)
    with torch.inference_mode():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_prompt_logprobs_match_transformers(engine, hf_tokenizer, hf_model):
    ids = chat_ids(hf_tokenizer, PROMPTS[0])
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    (event,) = engine.generate_sync([Generate("p", tuple(ids), params)])
    with torch.inference_mode():
        reference = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], dim=-1)
    expected = [reference[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert event.prompt_logprobs[0] is None
    assert [e.logprob for e in event.prompt_logprobs[1:]] == pytest.approx(expected, abs=LOGITS_ATOL)


def test_seeded_chat_samples_are_reproducible(engine, hf_tokenizer):
    ids = tuple(chat_ids(hf_tokenizer, PROMPTS[1]))
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, n=2, seed=42)

    def run() -> dict[int, list[int]]:
        out: dict[int, list[int]] = {0: [], 1: []}
        for e in engine.generate_sync([Generate("s", ids, params)]):
            out[e.index].extend(e.token_ids)
        return out

    first = run()
    assert run() == first
    assert first[0] != first[1]


def test_offline_llm_chats(engine):
    llm = LLM(engine=engine)
    (result,) = llm.chat(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=32))
    (completion,) = result.outputs
    assert completion.text == "The capital of France is Paris."
    assert completion.finish_reason == "stop"
