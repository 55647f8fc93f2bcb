"""Tiny random HF models written to a folder, to exercise the real loading code in milliseconds.

Each folder holds what a hub checkpoint holds: config.json, safetensors weights written by
transformers' `save_pretrained`, and a small byte-level BPE tokenizer trained with `tokenizers`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! Tokenizers turn text into numbers, and models turn numbers into text.",
    "A quick brown fox jumps over the lazy dog; 0123456789 + - * / = ? é ü ñ",
] * 20


def train_tokenizer(folder: Path, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    hf.chat_template = CHATML
    hf.save_pretrained(folder)
    return hf


def build_model(folder: Path, kind: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random `kind` ("llama" or "qwen2") model to `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder)
    shape: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    shape.update(overrides)
    config = LlamaConfig(**shape) if kind == "llama" else Qwen2Config(**shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # the default init zeroes biases and sets norms to one: randomise everything
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))
