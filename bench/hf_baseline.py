"""The HF transformers baseline: what a user gets from `model.generate` without a serving engine.

Three measures, all greedy and all producing exactly the requested number of tokens
(`min_new_tokens == max_new_tokens`, so EOS cannot cut a run short):
- one sequence at a time (time per output token),
- a static batch of B prompts, left-padded to the longest (aggregate output tok/s),
- time to first token (prefill + one decode step).
A streamer stamps the arrival of every decode step, so TTFT and inter-token latency come from the
same `generate` call that is timed for throughput.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from bench.model_files import hf_location
from bench.stats import RequestTiming


class _ArrivalClock(BaseStreamer):
    """Records when each decode step's tokens come out; `generate` first puts the prompt, skipped."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class HFTokenizer:
    """The model's HF tokenizer: the one source of prompt token ids for every backend in a run."""

    def __init__(self, model_path: str) -> None:
        _quiet_transformers()
        folder, gguf_file = hf_location(model_path)
        self.hf = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))

    def encode(self, text: str) -> list[int]:
        """Token ids exactly as the model's tokenizer gives them (special tokens as configured)."""
        return list(self.hf(text)["input_ids"])


class HFBaseline:
    """One HF causal LM loaded for benchmarking (eval mode, inference mode, given dtype)."""

    def __init__(self, model_path: str, tokenizer: HFTokenizer, dtype: str = "float32") -> None:
        _quiet_transformers()
        folder, gguf_file = hf_location(model_path)
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = tokenizer
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **extra)
        self.model.eval()
        pad = tokenizer.hf.pad_token_id
        self.pad_token_id: int = pad if pad is not None else (tokenizer.hf.eos_token_id or 0)

    def _generate(self, prompts: Sequence[Sequence[int]], output_len: int) -> tuple[float, list[float]]:
        """One `generate` call over a left-padded batch; returns (start time, per-step arrival times)."""
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + list(p) for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock = _ArrivalClock()
        with torch.inference_mode():
            start = time.perf_counter()
            self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=self.pad_token_id,
                streamer=clock,
            )
        return start, clock.times

    def static_batch(
        self, prompts: Sequence[Sequence[int]], output_lens: Sequence[int]
    ) -> list[RequestTiming]:
        """One static batch: every row decodes max(output_lens) steps; each request keeps its own share.

        A request's timing stops at its own length, but the batch only returns when the longest
        is done, which is the cost of static batching the comparison is meant to show.
        """
        start, times = self._generate(prompts, max(output_lens))
        return [
            RequestTiming(start=start, chunk_times=times[:n], output_tokens=n, prompt_tokens=len(p))
            for p, n in zip(prompts, output_lens, strict=True)
        ]

    def run(
        self, prompts: Sequence[Sequence[int]], output_lens: Sequence[int], batch_size: int
    ) -> list[RequestTiming]:
        """All prompts in consecutive static batches of `batch_size` (1: one sequence at a time)."""
        timings: list[RequestTiming] = []
        for first in range(0, len(prompts), batch_size):
            chunk = slice(first, first + batch_size)
            timings.extend(self.static_batch(prompts[chunk], output_lens[chunk]))
        return timings

    def ttft(self, prompt: Sequence[int]) -> float:
        """Time to first token of one sequence: prefill plus one decode step."""
        start, times = self._generate([prompt], 1)
        return times[0] - start

    def close(self) -> None:
        """Drop the weights now rather than whenever the object goes (the server needs the memory)."""
        del self.model
        gc.collect()

    def warmup(self, prompt: Sequence[int]) -> None:
        """Pay one-off costs (allocator, kernel selection) before anything is timed."""
        self._generate([prompt], 4)
