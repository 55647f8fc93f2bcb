"""`image_embeds` parts: a client's precomputed image embeddings (vLLM's `--enable-mm-embeds`).

The part holds base64 `torch.save` bytes of a float tensor `[positions, hidden]` (or `[1, positions,
hidden]`), what the model's projector would have produced; the model uses the rows as they are.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from protocol.media.data_url import decode_base64
from protocol.media.decoding import content_hash, invalid
from protocol.media.tensor_file import TensorFileError, read_tensor


class DecodedEmbeds(msgspec.Struct, frozen=True):
    """float32 little-endian rows, `shape == (positions, hidden)`."""

    data: bytes
    shape: tuple[int, int]
    hash: str


def decode_image_embeds(value: Any, hidden_size: int, *, where: str) -> DecodedEmbeds:
    """Decode one `image_embeds` value; a 400 naming `where` for anything but a finite float tensor
    of `hidden_size` columns."""
    if not isinstance(value, str):
        raise invalid("image_embeds", where, "'image_embeds' must be a base64 string of torch.save bytes.")
    raw = decode_base64(value, where=where, what="image_embeds")
    try:
        tensor = read_tensor(raw)
    except TensorFileError as exc:
        raise invalid("image_embeds", where, f"{exc}.") from None
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] != hidden_size:
        raise invalid(
            "image_embeds", where, f"expected a tensor of shape [positions, {hidden_size}], got {list(tensor.shape)}."
        )
    if not np.isfinite(tensor).all():
        raise invalid("image_embeds", where, "the embeddings hold NaN or infinite values.")
    data = np.ascontiguousarray(tensor, dtype="<f4").tobytes()
    shape = (int(tensor.shape[0]), int(tensor.shape[1]))
    return DecodedEmbeds(data, shape, content_hash("image_embeds/float32le", shape, data))
