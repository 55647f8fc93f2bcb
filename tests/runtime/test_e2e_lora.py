"""LoRA adapters through the served stack on SmolLM2-135M-Instruct (its quantized GGUF weights),
with the official `openai` client: greedy output equals transformers + peft for each adapter, alone
and with four adapters and the base model in one busy batch; adapters loaded, used, unloaded and
loaded again at run time.

The adapters are built here with peft over transformers' float32 copy of the same GGUF (random
LoRA weights of rank 8 and 16); transformers + peft is the reference.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sansllm.args import DEFAULT_MODEL, parse_serve_args
from sansllm.assemble import build_asgi_app, engine_config_from_args
from tests.engine.lora_adapters import build_adapter
from tests.runtime.server import BRIDGES, ServerThread

pytestmark = pytest.mark.e2e

TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 12
ADAPTERS = {"r8-all": (8, None), "r16-all": (16, None), "r8-attn": (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
            "r16-mlp": (16, ("gate_proj", "up_proj", "down_proj"))}  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The adapters' folders, the prompts' token ids and transformers + peft's greedy tokens."""
    from peft import PeftModel

    from engine import resolve_model

    source = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.path.name)
    base = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.path.name, dtype=torch.float32)
    root = tmp_path_factory.mktemp("adapters")
    folders = {}
    for seed, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        kwargs = {"targets": targets} if targets else {}
        folders[name] = build_adapter(None, root / name, rank=rank, seed=seed, std=0.05, base_model=base, **kwargs)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    model = PeftModel.from_pretrained(base, folders["r8-all"], adapter_name="r8-all")
    for name in list(ADAPTERS)[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.eval()
    expected: dict[tuple[str, int], list[int]] = {}

    def greedy(prompt: list[int]) -> list[int]:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        return out[0, len(prompt) :].tolist()

    with torch.no_grad():
        for name in ADAPTERS:
            model.set_adapter(name)
            for i, prompt in enumerate(prompts):
                expected[name, i] = greedy(prompt)
        with model.disable_adapter():
            for i, prompt in enumerate(prompts):
                expected[DEFAULT_MODEL, i] = greedy(prompt)
    return folders, prompts, expected


@pytest.fixture(scope="module")
def server(reference):
    from engine import Engine, EngineConfig

    folders, _, _ = reference
    modules = [f"{name}={folder}" for name, folder in folders.items() if name != "r16-mlp"]
    flags = ["--dtype", "float32", "--max-model-len", "1k", "--enable-lora", "--max-loras", "4",
             "--max-lora-rank", "16", "--lora-modules", *modules, "--allow-runtime-lora-updating"]  # fmt: skip
    args = parse_serve_args([DEFAULT_MODEL, *flags], environ={})
    config = engine_config_from_args(args, EngineConfig)
    config.progress = False
    engine = Engine(config)
    with ServerThread(build_asgi_app(args, [engine], BRIDGES["trio"]), "trio") as running:
        yield running


async def complete_all(url: str, jobs: list[tuple[str, list[int]]]) -> list[list[int]]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300) as client:

        async def one(model: str, prompt: list[int]) -> list[int]:
            completion = await client.completions.create(
                model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )  # fmt: skip
            assert completion.model == model
            return completion.choices[0].token_ids

        return await asyncio.gather(*(one(model, prompt) for model, prompt in jobs))


def test_runtime_load_then_each_adapter_alone_equals_peft(server, reference):
    folders, prompts, expected = reference
    loaded = httpx.post(
        f"{server.url}/v1/load_lora_adapter", json={"lora_name": "r16-mlp", "lora_path": str(folders["r16-mlp"])}
    )
    assert (loaded.status_code, loaded.text) == (200, "Success: LoRA adapter 'r16-mlp' added successfully.")
    listed = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert {card["id"]: card["parent"] for card in listed} == {DEFAULT_MODEL: None} | dict.fromkeys(ADAPTERS, DEFAULT_MODEL)
    for name in (DEFAULT_MODEL, *ADAPTERS):
        for i, prompt in enumerate(prompts):
            (got,) = asyncio.run(complete_all(server.url, [(name, prompt)]))
            assert got == expected[name, i], (name, i)
    assert all(expected[name, 0] != expected[DEFAULT_MODEL, 0] for name in ADAPTERS)  # they do change the output


def test_four_adapters_and_the_base_in_one_busy_batch(server, reference):
    _, prompts, expected = reference
    names = [DEFAULT_MODEL, *ADAPTERS]
    jobs = [(name, prompt) for _ in range(2) for name in names for prompt in prompts]
    got = asyncio.run(complete_all(server.url, jobs))
    want = [expected[name, i] for _ in range(2) for name in names for i in range(len(prompts))]
    assert got == want


def test_unload_gives_404_and_reload_serves_again(server, reference):
    folders, prompts, expected = reference
    gone = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "r8-attn"})
    assert (gone.status_code, gone.text) == (200, "Success: LoRA adapter 'r8-attn' removed successfully.")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError, match="The model `r8-attn` does not exist."):
            client.completions.create(model="r8-attn", prompt=prompts[0], max_tokens=2)
    again = httpx.post(
        f"{server.url}/v1/load_lora_adapter", json={"lora_name": "r8-attn", "lora_path": str(folders["r8-attn"])}
    )
    assert again.status_code == 200
    (got,) = asyncio.run(complete_all(server.url, [("r8-attn", prompts[1])]))
    assert got == expected["r8-attn", 1]
