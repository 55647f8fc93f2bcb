"""The cost of LoRA: 32 streams spread over four adapters against the same streams on the base model,
one server (`--enable-lora --max-loras 4`), rounds alternated (`bench.serving --rounds`).

The adapters are random PEFT adapters (rank 16 on every projection, as a fine-tune would have)
built over transformers' float32 copy of SmolLM2's GGUF and cached in
~/.cache/sansllm/bench-lora; building them needs peft (the test extra).

    python -m bench.lora [bench.serving flags, e.g. --record]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import serving
from bench.model_files import hf_location, resolve_model

CACHE = Path.home() / ".cache" / "sansllm" / "bench-lora"
ADAPTERS = ("lora-a", "lora-b", "lora-c", "lora-d")
RANK = 16


def build_adapters(model: str) -> dict[str, Path]:
    """Four random rank-16 adapters over `model` (built once, then read from the cache)."""
    folders = {name: CACHE / f"{model}-{name}" for name in ADAPTERS}
    if all((folder / "adapter_model.safetensors").is_file() for folder in folders.values()):
        return folders
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    print(f"[lora] building {len(ADAPTERS)} adapters over {path}", file=sys.stderr, flush=True)
    folder_of_model, gguf_file = hf_location(path)
    base = AutoModelForCausalLM.from_pretrained(folder_of_model, gguf_file=gguf_file, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for seed, folder in enumerate(folders.values()):
        peft_model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in peft_model.named_parameters():
                if "lora_" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        peft_model.save_pretrained(folder, safe_serialization=True)
        base = peft_model.unload()
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    model = serving.DEFAULT_MODEL_NAME
    folders = build_adapters(model)
    modules = " ".join(f"{name}={folder}" for name, folder in folders.items())
    server_args = f"--enable-lora --max-loras {len(folders)} --max-lora-rank {RANK} --lora-modules {modules}"
    mixed = json.dumps({"model": list(folders)})
    return serving.main(
        [
            "--no-hf", "--concurrency", "32", "--num-prompts", "96", "--input-len", "64,512", "--output-len", "64,128",
            "--server-args", server_args, "--variant-request-args", mixed, "--rounds", "3", *argv,
        ]
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
