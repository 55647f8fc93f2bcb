"""From a pooling request to the token ids the engine encodes: texts, token ids, chats, sentence pairs.

Shared by the pooling endpoints. Text is tokenized here (the engine only sees ids); truncation
keeps the last `truncate_prompt_tokens` ids (a text's special tokens stay, as HF's left-side
truncation keeps them; a sentence pair is cut by the tokenizer, longest text first); an input may fill the whole context window (nothing is
generated) but not more, with vLLM's message naming the endpoint's `operation`.

A chat for a vision-language model (an LLaVA served with `--convert embed`) may hold images: they
are placed on their expanded placeholders as a chat completion's are (`protocol.calls.chat`), and
the chat comes back with its `MediaPlan`, which the endpoint has fetched and decoded before it
submits the `Encode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.calls.prompt import ChatRenderer, encode_text
from protocol.engine_api import MediaInput
from protocol.errors import ProtocolError
from protocol.media.placement import place_media, shift_placements
from protocol.media.resolve import MediaPlan
from protocol.model import ServedModel
from protocol.pooling_requests import ChatStyleRequest, PoolingInput
from protocol.pooling_validation import check_pooling_length
from protocol.validation import check_generation_prompt, truncation_length

EMBEDDING = "embedding generation"  # vLLM's word for embeddings, pooling and rerank inputs
CLASSIFICATION = "classification"
SCORE = "score"


@dataclass(frozen=True, slots=True)
class EngineInput:
    """One prompt for one `Encode`."""

    token_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...] | None = None
    media: tuple[MediaInput, ...] = ()  # a chat's decoded images, on their placeholder runs


@dataclass(frozen=True, slots=True)
class ChatInput:
    """A chat rendered for pooling: its prompt, and the plan of its media parts (None: it has none),
    which must be fetched and decoded into `prompt.media` before the `Encode` is sent."""

    prompt: EngineInput
    plan: MediaPlan | None = None


def input_items(value: PoolingInput, param: str = "input") -> list[str | list[int]]:
    """`input` as a list of inputs: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        items: list[str | list[int]] = [value]
    elif value and all(isinstance(item, int) for item in value):
        items = [list(value)]
    else:
        items = list(value)
    if not items:
        raise ProtocolError(
            f"`{param}` cannot be empty: give a string, a list of strings, a list of token ids "
            "or a list of token-id lists.",
            param=param,
        )
    for index, item in enumerate(items):
        if len(item) == 0:
            what = "an empty string" if isinstance(item, str) else "an empty list of token ids"
            where = f"`{param}`" if isinstance(value, str) else f"`{param}[{index}]`"
            raise ProtocolError(f"{where} is {what}; every input needs at least one token.", param=param)
    return items


def prompt_input(
    item: str | Sequence[int],
    model: ServedModel,
    *,
    add_special_tokens: bool,
    truncate_prompt_tokens: int | None,
    operation: str,
    param: str = "input",
) -> EngineInput:
    """One text (tokenized) or token-id list, truncated if asked and checked."""
    if isinstance(item, str):
        ids = encode_text(model.tokenizer, item, add_special_tokens, param=param)
        keep = truncation_length(truncate_prompt_tokens, model.max_model_len)
        if add_special_tokens and keep is not None and len(ids) > keep:
            ids = _truncate_keeping_specials(item, ids, model, keep, param)
    else:
        ids = list(item)
    return EngineInput(_prepare(ids, model, truncate_prompt_tokens, operation, param))


def _truncate_keeping_specials(
    text: str, ids: list[int], model: ServedModel, keep: int, param: str
) -> list[int]:
    """Cut the text's own tokens, not the special tokens around them (as HF truncation does):
    `[CLS] a b c [SEP]` kept to 4 is `[CLS] b c [SEP]`. Falls back to keeping the last ids."""
    content = encode_text(model.tokenizer, text, False, param=param)
    extra = len(ids) - len(content)
    for start in range(extra + 1):
        if ids[start : start + len(content)] == content:
            prefix, suffix = ids[:start], ids[start + len(content) :]
            room = keep - len(prefix) - len(suffix)
            if room > 0:
                return prefix + content[len(content) - room :] + suffix
            break
    return ids[len(ids) - keep :]


def chat_input(
    request: ChatStyleRequest, model: ServedModel, renderer: ChatRenderer, *, operation: str
) -> ChatInput:
    """The chat rendered by the template (as /tokenize does), tokenized, truncated and checked.

    On a multimodal model its placeholders are expanded to each image's positions (placeholders
    typed in the text count too, and are refused without an image, as in chat completions); a
    truncation that cuts into an image is a 400. A text-only model refuses media parts."""
    check_generation_prompt(request.add_generation_prompt, request.continue_final_message)
    text, media = renderer.render_with_media(request, model)
    ids = encode_text(model.tokenizer, text, request.add_special_tokens, param="messages")
    plan = MediaPlan(media, model.multimodal) if model.multimodal is not None else None
    if plan is not None:
        ids, placements = place_media(ids, media, plan.spec, plan.lengths())
    token_ids = _prepare(ids, model, request.truncate_prompt_tokens, operation, "messages")
    if plan is None or not media:
        return ChatInput(EngineInput(token_ids))
    plan.place(shift_placements(placements, len(ids) - len(token_ids)))
    return ChatInput(EngineInput(token_ids), plan)


def pair_input(
    text: str,
    text_pair: str,
    model: ServedModel,
    *,
    truncate_prompt_tokens: int | None,
    operation: str,
    param: str,
) -> EngineInput:
    """A sentence pair for a cross-encoder, joined by the tokenizer with its token type ids."""
    keep = truncation_length(truncate_prompt_tokens, model.max_model_len)
    try:
        if keep is None:
            ids, types = model.tokenizer.encode_pair(text, text_pair, add_special_tokens=True)
        else:
            ids, types = model.tokenizer.encode_pair(
                text, text_pair, add_special_tokens=True, max_length=keep
            )
    except Exception as exc:
        raise ProtocolError(f"The {param} could not be tokenized: {exc}", param=param) from None
    token_ids = tuple(ids)
    _check_ids(token_ids, model.tokenizer.vocab_size, param)
    check_pooling_length(len(token_ids), model.max_model_len, operation, param)
    type_ids = tuple(types)
    if len(type_ids) != len(token_ids):
        raise ValueError(f"the tokenizer gave {len(type_ids)} token type ids for {len(token_ids)} tokens")
    return EngineInput(token_ids, type_ids if any(type_ids) else None)


def _prepare(
    ids: Sequence[int], model: ServedModel, truncate_prompt_tokens: int | None, operation: str, param: str
) -> tuple[int, ...]:
    keep = truncation_length(truncate_prompt_tokens, model.max_model_len)
    token_ids = tuple(ids)
    if keep is not None and len(token_ids) > keep:
        token_ids = token_ids[len(token_ids) - keep :]
    _check_ids(token_ids, model.tokenizer.vocab_size, param)
    check_pooling_length(len(token_ids), model.max_model_len, operation, param)
    return token_ids


def _check_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> None:
    if not token_ids:
        raise ProtocolError(
            f"An input of `{param}` has no tokens; every input needs at least one.", param=param
        )
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise ProtocolError(f"Token id {token_id} is out of vocabulary", param=param)
