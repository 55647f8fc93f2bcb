"""The engine contract: commands the runtime sends to the engine thread and events it gets back.

Plain msgspec structs so they are cheap to build, compare and copy across the thread boundary.
Text never crosses this boundary: the protocol core tokenizes and detokenizes; the engine only
sees token ids. Events are delivered in one batch per engine step.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort"]


class StructuredOutput(msgspec.Struct, omit_defaults=True, frozen=True):
    """A decoding constraint; at most one of the constraint fields is set."""

    json: str | None = None  # a JSON schema, serialized
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # a Lark / EBNF grammar
    json_object: bool = False  # any JSON object
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    # "outlines": compile a JSON schema with outlines-core (the request's guided_decoding_backend);
    # None: the engine's choice (engine.structured.guides.uses_outlines_core)
    backend: str | None = None


class SamplingParams(msgspec.Struct, omit_defaults=True, frozen=True):
    """Everything the engine needs, in token space. Validated by the protocol core already."""

    max_tokens: int = 16
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False  # beam search's stopping rule (see engine.beam_search)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words_token_ids: tuple[tuple[int, ...], ...] | None = None
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # top-k logprobs per sampled token; None: none
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None


PoolingTask = Literal["embed", "classify", "score", "token_embed", "token_classify"]


class PoolingParams(msgspec.Struct, omit_defaults=True, frozen=True):
    """What to pool from a prompt's hidden states. Validated by the protocol core already.

    - `embed`: one vector per prompt (the model's pooling: mean, cls or last), L2-normalised unless
      `normalize` is False, truncated to `dimensions` first (Matryoshka models only);
    - `classify` / `score`: the classification head's outputs for the prompt (a sentence pair for
      cross-encoders), through its activation (softmax, or sigmoid for one label) unless
      `use_activation` is False;
    - `token_embed` / `token_classify`: the same per token, one row per prompt token.
    """

    task: PoolingTask = "embed"
    normalize: bool | None = None  # None: the model's default (True for embedding models)
    dimensions: int | None = None
    use_activation: bool | None = None  # None: the model's default (True)


# ---- commands (runtime -> engine) ----


class MediaInput(msgspec.Struct, frozen=True):
    """One decoded media item of a prompt, placed on its run of placeholder tokens.

    The protocol core decodes, validates and resizes (for images: the model's resize and crop, so
    `data` holds what the vision tower sees before normalisation); the engine turns `data` into
    tensors. `hash` (hex SHA-256 of the decoded content) enters the prefix-cache key of every block
    the item covers, so equal text with different media never shares blocks.
    """

    kind: Literal["image", "image_embeds", "audio", "video"]
    hash: str
    offset: int  # the first prompt position of the item's placeholder tokens
    length: int  # how many placeholder tokens it fills
    # image: uint8 RGB, row-major [height, width, 3]; image_embeds: float32 rows (the model's input
    # embeddings); audio: float32 mono samples
    data: bytes
    # image: (height, width, 3); image_embeds: (length, hidden); audio: (samples,); video: (frames, h, w, 3)
    shape: tuple[int, ...]


class Generate(msgspec.Struct, tag=True, frozen=True):
    """Generate from a prompt. Requests with different `cache_salt` never share prefix-cache blocks."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    lora_name: str | None = None  # a LoRA adapter registered on the engine (None: the base model)
    media: tuple[MediaInput, ...] = ()  # in prompt order, on non-overlapping placeholder runs


class Encode(msgspec.Struct, tag=True, frozen=True):
    """Pool one prompt's hidden states (prefill only, nothing is sampled); answered by one `Pooled`.

    A sentence pair for a cross-encoder arrives already joined by the tokenizer, with its segment
    ids in `token_type_ids` (None: all zeros). A chat for a vision-language embedding model carries
    its images in `media`, placed on their placeholder runs as a `Generate`'s are.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: PoolingParams
    token_type_ids: tuple[int, ...] | None = None
    priority: int = 0
    cache_salt: str | None = None
    media: tuple[MediaInput, ...] = ()  # in prompt order, on non-overlapping placeholder runs


class Abort(msgspec.Struct, tag=True, frozen=True):
    """Stop a request. `index` aborts one of its n samples (a stop string matched); None aborts all."""

    request_id: str
    index: int | None = None


class LoadAdapter(msgspec.Struct, tag=True, frozen=True):
    """Register the LoRA adapter in folder `path` as `name`; answered by `AdapterLoaded` or `Failed`."""

    request_id: str
    name: str
    path: str
    replace: bool = False  # a loaded adapter of that name gives way (vLLM's load_inplace)


class UnloadAdapter(msgspec.Struct, tag=True, frozen=True):
    """Stop serving adapter `name` (running requests finish); answered by `AdapterUnloaded` or `Failed`."""

    request_id: str
    name: str


Command = Generate | Encode | Abort | LoadAdapter | UnloadAdapter


# ---- events (engine -> runtime) ----


class TokenLogprobs(msgspec.Struct, array_like=True, frozen=True):
    """Logprob of one chosen token and the top-k alternatives at that position."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of the chosen token in the distribution
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first


class Tokens(msgspec.Struct, tag=True, frozen=True):
    """New tokens for sample `index` of a request, produced in one engine step.

    `finish_reason` is set on the last event of a sample. `stop_reason` is the stop token id that
    ended it, if any. `prompt_logprobs` comes once, on the first event (first entry None). A
    `best_of` or beam-search request sends each returned sample once, finished, with its whole
    output, when the engine has chosen which to return.
    """

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None
    cumulative_logprob: float | None = None
    # tokens generated for candidates that are not returned (best_of), counted in usage; set on one
    # final event of the request
    num_discarded_tokens: int = 0


class Pooled(msgspec.Struct, tag=True, frozen=True):
    """The answer to an `Encode`: a vector (embed, classify, score) or one row per token (token_*)."""

    request_id: str
    data: tuple[float, ...] | tuple[tuple[float, ...], ...]
    num_prompt_tokens: int


class Failed(msgspec.Struct, tag=True, frozen=True):
    """The engine could not serve a request (bad constraint, out of memory, internal error)."""

    request_id: str
    status: int
    message: str


class AdapterLoaded(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    name: str
    path: str  # the folder it was read from, resolved


class AdapterUnloaded(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    name: str


Event = Tokens | Pooled | Failed | AdapterLoaded | AdapterUnloaded
