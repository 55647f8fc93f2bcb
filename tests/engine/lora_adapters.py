"""PEFT LoRA adapters with random weights, built in the test over a base model folder, and the
reference: transformers + peft generating greedily with one of them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_adapter(
    base: Path | str,
    folder: Path,
    *,
    rank: int,
    seed: int,
    targets: Sequence[str] = ALL_PROJECTIONS,
    alpha: int | None = None,
    rslora: bool = False,
    std: float = 0.2,
    base_model: torch.nn.Module | None = None,
) -> Path:
    """Save a LoRA adapter of `rank` with random A and B (PEFT zeroes B at init: its deltas would be 0)."""
    model = base_model if base_model is not None else AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), use_rslora=rslora, lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_model.save_pretrained(folder, safe_serialization=True)
    peft_model.unload()  # leave the base model as it was
    return folder


def reference_greedy(
    base: Path | str, adapter: Path | None, prompt: Sequence[int], max_new_tokens: int, **load: object
) -> list[int]:
    """Greedy tokens from transformers (+ peft with `adapter`), in float32."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **load)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt)]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
