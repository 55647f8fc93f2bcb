"""Where each media item sits in the prompt's token ids: its placeholder token, expanded.

A chat template writes one placeholder token per image (`<image>`); the model reads one position per
image embedding. HF's LLaVA processor repeats the placeholder text `image_tokens` times before
tokenizing; repeating the placeholder token id gives the same ids (it is a special token), without
re-tokenizing the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from protocol.errors import ProtocolError
from protocol.media.parts import MediaPart
from protocol.media.spec import MultimodalSpec

Placement = tuple[int, int]  # (first position, number of positions)


def place_media(
    token_ids: Sequence[int],
    parts: Sequence[MediaPart],
    spec: MultimodalSpec,
    lengths: Sequence[int | None] | None = None,
) -> tuple[list[int], list[Placement]]:
    """Expand each image placeholder token; return the new ids and each part's placement, in order.

    `lengths`: positions per part where an item sets its own (image embeddings: their rows); None
    (or a None entry) is the model's `image_tokens`."""
    wanted = [part for part in parts if part.kind == "image"]
    if len(wanted) != len(parts):  # no model here has placeholders for audio or video yet
        other = next(part for part in parts if part.kind != "image")
        raise ProtocolError(f"This model does not accept {other.kind} inputs: {other.where}.", param="messages")
    found = sum(1 for token in token_ids if token == spec.image_token_id)
    if found != len(wanted):
        raise ProtocolError(
            f"The prompt holds {found} image placeholder(s) ({spec.image_token!r}) for {len(wanted)} image(s); "
            "each image needs exactly one (the chat template writes them; do not type them in the text).",
            param="messages",
        )
    sizes = [spec.image_tokens if n is None else n for n in (lengths or [None] * len(wanted))]
    ids: list[int] = []
    placements: list[Placement] = []
    for token in token_ids:
        if token == spec.image_token_id:
            size = sizes[len(placements)]
            placements.append((len(ids), size))
            ids.extend([token] * size)
        else:
            ids.append(token)
    return ids, placements


def shift_placements(placements: Sequence[Placement], cut: int) -> list[Placement]:
    """Placements after the first `cut` prompt tokens were dropped (left truncation); a 400 when
    the cut goes through an item."""
    if any(offset < cut for offset, _ in placements):
        raise ProtocolError(
            "truncate_prompt_tokens would cut a media item out of the prompt; keep more tokens.",
            param="truncate_prompt_tokens",
        )
    return [(offset - cut, length) for offset, length in placements]
