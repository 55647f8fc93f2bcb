"""Driving a model directly on a paged KV cache, for tests that compare logits without the engine."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from engine.attention import PagedKVCache, SequenceSpan, build_step
from engine.models.llama import LlamaForCausalLM


class PagedRunner:
    """Feeds sequences to `model` chunk by chunk; each sequence gets its own run of blocks."""

    def __init__(self, model: LlamaForCausalLM, max_len: int = 512, max_seqs: int = 4, block_size: int = 16):
        param = next(model.parameters())
        self.model = model
        self.blocks_per_seq = -(-max_len // block_size)
        self.cache = PagedKVCache(
            model.config, self.blocks_per_seq * max_seqs, block_size, param.dtype, param.device
        )
        self.lengths: dict[Hashable, int] = {}

    def forward(self, chunks: Sequence[tuple[Hashable, Sequence[int]]]) -> torch.Tensor:
        """Hidden states of the new tokens of each (sequence, token ids) chunk, in one flat batch."""
        spans = []
        for key, token_ids in chunks:
            start = self.lengths.setdefault(key, 0)
            first = list(self.lengths).index(key) * self.blocks_per_seq
            spans.append(SequenceSpan(list(token_ids), start, range(first, first + self.blocks_per_seq)))
            self.lengths[key] = start + len(token_ids)
        inputs = build_step(self.cache, spans)
        with torch.inference_mode():
            return self.model(inputs.input_ids, inputs.positions, inputs.meta)

    def logits(self, chunks: Sequence[tuple[Hashable, Sequence[int]]]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.compute_logits(self.forward(chunks))


def prefill_logits(model: LlamaForCausalLM, ids: Sequence[int]) -> torch.Tensor:
    """Logits of every position of one prompt run in a single prefill."""
    return PagedRunner(model, max_len=len(ids), max_seqs=1).logits([(0, ids)])
