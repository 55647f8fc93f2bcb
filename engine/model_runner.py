"""Model runners: each owns a model and turns a scheduled step into hidden states, logits or pooled outputs.

The cores (`engine.core` for decoders, `engine.encoder_core` for encoders) decide *what* runs;
a runner knows *how*: the tensors, the KV cache, the forward pass. In nano-vllm's spirit, one
object owns the model, its cache and the step's inputs, so the bookkeeping above it never touches
a tensor it does not get back from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention import PagedKVCache, SequenceSpan, build_step
from engine.audio_encoder_cache import AudioEncoderCache
from engine.lora import LoRAManager
from engine.media_embeddings import MediaEmbedder
from engine.models.llama import LlamaForCausalLM
from engine.models.whisper import CrossInputs
from engine.pooling import classifier_activation, embedding_output, pool
from kernels.kv_cache import copy_blocks
from protocol.engine_api import PoolingParams


@dataclass
class DecoderStep:
    """One forward pass over a mixed batch: final hidden states and where each span ends in them."""

    hidden: torch.Tensor  # [num_tokens, hidden]
    ends: list[int]  # row after the last token of each span, in span order


class DecoderRunner:
    """A decoder model with its paged KV cache."""

    def __init__(
        self, model: LlamaForCausalLM, num_kv_blocks: int, block_size: int, lora: LoRAManager | None = None
    ) -> None:
        self.model = model
        self.lora = lora
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_cache = PagedKVCache(self.config, num_kv_blocks, block_size, self.dtype, self.device)
        # a vision-language model (engine.models.llava) embeds the images of a step's spans
        self.media = MediaEmbedder(model) if hasattr(model, "embed_images") else None  # type: ignore[arg-type]
        # an encoder-decoder speech model (engine.models.whisper): each span's audio, cross-attended
        self.speech = AudioEncoderCache(model) if hasattr(model, "cross_kv") else None  # type: ignore[arg-type]

    def forward(self, spans: Sequence[SequenceSpan], adapters: Sequence[int | None] | None = None) -> DecoderStep:
        """`adapters`: the LoRA adapter of each span (None: the base model)."""
        inputs = build_step(self.kv_cache, spans)
        embeds = self.media.step_embeds(spans) if self.media is not None else None
        extra: dict = {"embeds": embeds} if embeds is not None else {}
        if self.speech is not None:
            extra["cross"] = CrossInputs(self.speech.step_cross(spans), [len(span.token_ids) for span in spans])
        if self.lora is None or adapters is None:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, **extra)
            return DecoderStep(hidden, inputs.meta.query_ends)
        self.lora.begin_step(adapters, [len(span.token_ids) for span in spans])
        try:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, **extra)
        finally:
            self.lora.end_step()
        return DecoderStep(hidden, inputs.meta.query_ends)

    def copy_blocks(self, batches: Sequence[Sequence[tuple[int, int]]]) -> None:
        """Run the KV manager's pending block copies (copy on write of forked sequences), in order."""
        for pairs in batches:
            copy_blocks(self.kv_cache.layers, list(pairs))

    def logits(self, hidden: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """float32 logits of the chosen rows of `hidden` (all rows when `rows` is None)."""
        if rows is not None:
            hidden = hidden[torch.tensor(rows, device=hidden.device)]
        return self.model.compute_logits(hidden)

    def embed_last(self, hidden: torch.Tensor, rows: Sequence[int], params: Sequence[PoolingParams]) -> list:
        """Embeddings pooled from the last prompt token of each sequence (decoder embedding models)."""
        vectors = hidden[torch.tensor(rows, device=hidden.device)].float()
        return [
            embedding_output(vectors[i : i + 1], p.dimensions, p.normalize is not False)[0]
            for i, p in enumerate(params)
        ]


@dataclass(frozen=True)
class EncoderInput:
    """One whole input of an encoder step."""

    token_ids: Sequence[int]
    token_type_ids: Sequence[int] | None
    params: PoolingParams


class EncoderRunner:
    """A BERT-family encoder: whole inputs in one padding-free batch, pooled per request."""

    def __init__(
        self, model: torch.nn.Module, method: str, normalize: bool, problem_type: str | None = None
    ) -> None:
        self.model = model
        self.method = method  # mean, cls or last (sentence-transformers' pooling of this model)
        self.normalize = normalize
        self.problem_type = problem_type  # the classifier's activation (see engine.pooling)
        self.device = next(model.parameters()).device

    def run(self, inputs: Sequence[EncoderInput]) -> list[torch.Tensor]:
        """One output per input, in order: a vector (embed, classify, score) or rows (token_embed)."""
        lengths = [len(item.token_ids) for item in inputs]
        ids = torch.tensor([t for item in inputs for t in item.token_ids], dtype=torch.long)
        types = torch.tensor(
            [t for item in inputs for t in (item.token_type_ids or (0,) * len(item.token_ids))],
            dtype=torch.long,
        )
        positions = torch.cat([torch.arange(n) for n in lengths])
        hidden = self.model(ids.to(self.device), positions.to(self.device), types.to(self.device), lengths)
        tasks = {item.params.task for item in inputs}
        pooled = pool(hidden, lengths, self.method).float() if "embed" in tasks else None
        scores = None
        if tasks & {"classify", "score"}:
            scores = self.model.classify(hidden, lengths)
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        outputs = []
        for i, item in enumerate(inputs):
            p = item.params
            if p.task == "embed":
                normalize = self.normalize if p.normalize is None else p.normalize
                outputs.append(embedding_output(pooled[i : i + 1], p.dimensions, normalize)[0])
            elif p.task in ("classify", "score"):
                outputs.append(classifier_activation(scores[i : i + 1], p.use_activation is not False, self.problem_type)[0])
            else:  # token_embed: every token's hidden state
                rows = hidden[starts[i] : starts[i + 1]].float()
                normalize = self.normalize if p.normalize is None else p.normalize
                outputs.append(embedding_output(rows, p.dimensions, normalize))
        return outputs
