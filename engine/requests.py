"""Per-request and per-sample state inside the engine, and the checks a new request must pass."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.best_of import BestOfCollector
from engine.scheduler import Sequence
from protocol.engine_api import Encode, FinishReason, Generate, MediaInput, SamplingParams, TokenLogprobs
from protocol.media.spec import MultimodalSpec

if TYPE_CHECKING:
    from engine.beam_search import BeamSearch


class RequestRejected(ValueError):
    """A request the engine will not run; becomes `Failed(request_id, status, message)`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class SampleState:
    """One of a request's n samples: its scheduled sequence plus what its events need."""

    seq: Sequence
    generator: torch.Generator | None
    cumulative_logprob: float = 0.0
    sent_first_event: bool = False
    beam_logprobs: list[TokenLogprobs] | None = None  # a beam's logprob entries, sent when it finishes
    last_token_at: float | None = None  # engine.latency: when its last step gave it tokens

    @property
    def index(self) -> int:
        return self.seq.index

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int
    arrival: int
    max_tokens: int  # max_tokens capped by the room left in the context window
    live_indices: set[int] = field(default_factory=set)  # sample indices not yet finished or aborted
    samples: dict[int, SampleState] = field(default_factory=dict)
    # prompt logprobs scored so far, one entry per prompt position (the first is None); complete
    # when it has one entry per prompt token
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int | None = None  # prefix-cache hit of the first sample to be scheduled
    prompt_counted: bool = False  # its prompt tokens are in the engine's totals
    best_of: BestOfCollector | None = None  # holds the candidates' events when best_of > n
    beam: BeamSearch | None = None  # the beam-search state (its samples are the live beams)
    # engine.latency stamps (time.perf_counter): arrival, first scheduled, first token
    added_at: float = 0.0
    scheduled_at: float | None = None
    first_token_at: float | None = None

    @property
    def grouped(self) -> bool:
        """Its samples are candidates chosen among at the end (best_of, beam search): the client
        sees only the chosen ones, so it cannot abort one sample of it."""
        return self.best_of is not None or self.params.use_beam_search

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def scoring_prompt(self) -> bool:
        """Prompt logprobs were asked for and are not complete yet."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens


def validate(command: Generate, vocab_size: int, max_model_len: int, max_num_seqs: int) -> int:
    """Refuse what the engine cannot do; return max_tokens capped to the context window."""
    p = command.params
    prompt = command.prompt_token_ids
    if p.n < 1:
        raise RequestRejected(f"n must be at least 1, got {p.n}")
    if p.best_of is not None and p.best_of < p.n:
        raise RequestRejected(f"best_of must be at least n={p.n}, got {p.best_of}")
    width = num_candidates(p)
    if width > max_num_seqs:
        what = f"best_of={p.best_of}" if p.best_of is not None else f"n={p.n}"
        raise RequestRejected(f"{what} exceeds the engine's max_num_seqs={max_num_seqs}")
    if p.early_stopping not in (True, False, "never"):
        raise RequestRejected(f"early_stopping must be true, false or 'never', got {p.early_stopping!r}")
    if p.max_tokens < 0:
        raise RequestRejected(f"max_tokens must be at least 0, got {p.max_tokens}")
    if not prompt:
        raise RequestRejected("the prompt is empty")
    room = max_model_len - len(prompt)
    if room < (1 if p.max_tokens > 0 else 0):
        raise RequestRejected(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{len(prompt)} input tokens. Please reduce the length of the input messages."
        )
    _check_ids("prompt", prompt, vocab_size)
    _check_ids("logit_bias", p.logit_bias or (), vocab_size)
    _check_ids("allowed_token_ids", p.allowed_token_ids or (), vocab_size)
    if p.allowed_token_ids is not None and not p.allowed_token_ids:
        raise RequestRejected("allowed_token_ids is empty")
    _check_ids("stop_token_ids", p.stop_token_ids, vocab_size)
    for word in p.bad_words_token_ids or ():
        if not word:
            raise RequestRejected("bad_words_token_ids holds an empty sequence")
        _check_ids("bad_words_token_ids", word, vocab_size)
    return min(p.max_tokens, room)


def num_candidates(params: SamplingParams) -> int:
    """Sequences a request runs at once: `best_of` if given, else `n` (also the beam width)."""
    return params.n if params.best_of is None else params.best_of


def check_pooling(
    command: Encode, tasks: frozenset[str], vocab_size: int, max_model_len: int, hidden_size: int
) -> None:
    """Refuse an `Encode` the model cannot serve (the protocol core checked the API-level rules)."""
    p, prompt = command.params, command.prompt_token_ids
    if p.task not in tasks:
        served = ", ".join(sorted(tasks)) or "nothing"
        raise RequestRejected(f"this model does not serve the {p.task!r} task; it serves {served}")
    if not prompt:
        raise RequestRejected("the input is empty")
    if len(prompt) > max_model_len:
        raise RequestRejected(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{len(prompt)} tokens in the input. Please reduce the length of the input."
        )
    _check_ids("prompt", prompt, vocab_size)
    if command.token_type_ids is not None and len(command.token_type_ids) != len(prompt):
        raise RequestRejected("token_type_ids must have one entry per prompt token")
    if p.dimensions is not None and not 1 <= p.dimensions <= hidden_size:
        raise RequestRejected(f"dimensions must lie in [1, {hidden_size}], got {p.dimensions}")


def _check_ids(what: str, ids, vocab_size: int) -> None:
    bad = sorted({int(i) for i in ids if not 0 <= int(i) < vocab_size})
    if bad:
        raise RequestRejected(f"{what} holds token ids outside the vocabulary [0, {vocab_size}): {bad[:10]}")


def finish_check(
    token: int, sample: SampleState, request: RequestState, eos_token_ids: frozenset[int]
) -> tuple[FinishReason, int | None] | None:
    """Whether `token` (already appended) ends the sample: (finish_reason, stop_reason) or None.

    Same order as vLLM's `check_stop`: the length limit wins over a stop token sampled last.
    """
    p = request.params
    produced = len(sample.output_token_ids)
    if produced >= request.max_tokens:
        return "length", None
    if produced < p.min_tokens:
        return None
    if not p.ignore_eos and token in eos_token_ids:
        return "stop", None
    if token in p.stop_token_ids:
        return "stop", token
    return None


@dataclass(frozen=True)
class ImageInputs:
    """What a model that takes images expects of a prompt's image items (engine.models.llava)."""

    token_id: int  # the placeholder token every image position carries
    tokens_per_image: int
    hidden_size: int = 0  # columns of an `image_embeds` item (0: none accepted)


def image_inputs(spec: MultimodalSpec | None) -> ImageInputs | None:
    """What `check_media` needs of a model's multimodal spec (None: the model takes no images)."""
    if spec is None or "image" not in spec.modalities:
        return None
    return ImageInputs(spec.image_token_id, spec.image_tokens, spec.embeds_hidden_size)


def check_media(
    prompt: SequenceOf[int], media: SequenceOf[MediaInput], images: ImageInputs | None
) -> None:
    """Refuse media the model cannot take or that does not sit on its placeholder runs.

    Takes the prompt and its media rather than a command: a `Generate` and an `Encode` (a
    vision-language embedding model) carry them alike. The protocol core places items correctly;
    this guards the engine's own callers (offline use, other front ends) against a misplaced item,
    which would otherwise embed the wrong rows."""
    if images is None:
        if media:
            raise RequestRejected("This model does not accept media inputs; send text only.")
        return
    end = 0
    for i, item in enumerate(media):
        where = f"media[{i}]"
        if item.kind == "image_embeds":
            _check_embeds(item, images.hidden_size, where)
        elif item.kind != "image":
            raise RequestRejected(f"{where}: this model takes images only, not {item.kind}")
        elif len(item.shape) != 3 or item.shape[2] != 3 or len(item.data) != item.shape[0] * item.shape[1] * 3:
            raise RequestRejected(f"{where}: an image's data must be 8-bit RGB of its shape {item.shape}")
        elif item.length != images.tokens_per_image:
            raise RequestRejected(f"{where}: an image fills {images.tokens_per_image} positions, not {item.length}")
        if item.offset < end or item.offset + item.length > len(prompt):
            raise RequestRejected(f"{where}: its positions overlap another item or run past the prompt")
        if any(token != images.token_id for token in prompt[item.offset : item.offset + item.length]):
            raise RequestRejected(f"{where}: its positions must all hold the image token {images.token_id}")
        end = item.offset + item.length
    placed = sum(item.length for item in media)
    if sum(1 for token in prompt if token == images.token_id) != placed:
        raise RequestRejected("the prompt has image tokens that no image fills")


def _check_embeds(item: MediaInput, hidden_size: int, where: str) -> None:
    """Precomputed image embeddings: float32 rows of the model's hidden size, one per position."""
    if hidden_size <= 0:
        raise RequestRejected(f"{where}: this model takes no image embeddings")
    if item.shape != (item.length, hidden_size) or len(item.data) != item.length * hidden_size * 4:
        raise RequestRejected(
            f"{where}: image embeddings must be float32 of shape ({item.length}, {hidden_size}), got {item.shape}"
        )


def check_audio(media: SequenceOf[MediaInput], max_samples: int) -> None:
    """A speech model's request: exactly one audio window of at most `max_samples` float32 samples,
    filling no prompt positions (the decoder attends to it across)."""
    if len(media) != 1 or media[0].kind != "audio":
        raise RequestRejected("A speech model's request needs exactly one audio window (media of kind 'audio').")
    (item,) = media
    if item.length != 0 or item.shape != (len(item.data) // 4,) or len(item.data) % 4:
        raise RequestRejected("The audio window must be float32 samples of shape (samples,) filling no positions.")
    if not 0 < item.shape[0] <= max_samples:
        raise RequestRejected(f"The audio window must hold 1 to {max_samples} samples, not {item.shape[0]}.")
