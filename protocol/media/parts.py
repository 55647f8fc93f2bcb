"""Chat content parts that carry media: read in order while messages are normalized, and checked.

OpenAI's shapes (and vLLM's extras): `{"type": "image_url", "image_url": {"url": ...}}` (also a bare
string, and `input_image` with `image_url` as a string), `{"type": "input_audio", "input_audio":
{"data": <base64>, "format": "wav"}}`, `audio_url` and `video_url` like `image_url`. vLLM accepts a
part without `type` when its key says what it is. `image_embeds` (base64 `torch.save` bytes of the
embeddings, read without unpickling anything else: protocol.media.tensor_file) needs
`--enable-mm-embeds`, as in vLLM; `image_pil` and `audio_embeds` are objects of vLLM's Python API
that HTTP does not carry: refused.

The template sees a placeholder where each item was: `{"type": "image"}` in a list of parts (what
HF chat templates test for), or the model's placeholder text for templates that take one string.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from protocol.errors import ProtocolError
from protocol.media.spec import Modality, MultimodalSpec

# part type -> (modality, the key holding its source)
MEDIA_PARTS: dict[str, tuple[Modality, str]] = {
    "image_url": ("image", "image_url"),
    "input_image": ("image", "image_url"),
    "audio_url": ("audio", "audio_url"),
    "input_audio": ("audio", "input_audio"),
    "video_url": ("video", "video_url"),
    "image_embeds": ("image", "image_embeds"),
}
# parts vLLM's Python API takes but HTTP does not carry
PYTHON_ONLY_PARTS = frozenset({"image_pil", "audio_embeds"})
DEFAULT_LIMIT = 999  # vLLM's default --limit-mm-per-prompt for each modality


class MediaPart(msgspec.Struct, frozen=True):
    """One media item of a prompt, in order: where it came from and its source (not fetched yet)."""

    kind: Modality
    where: str  # e.g. "messages[1].content[0]", for errors that name the part
    url: str | None = None  # image_url / audio_url / video_url: data:, http(s): or file: URL
    input_audio: Any = None  # input_audio's {"data": base64, "format": ...}
    embeds: Any = None  # image_embeds' base64 torch.save bytes


def _bad(message: str) -> ProtocolError:
    return ProtocolError(message, param="messages")


class MediaCollector:
    """Collects a chat's media parts while its messages are normalized; enforces what the model takes
    (`spec.modalities`) and `--limit-mm-per-prompt`."""

    def __init__(
        self, spec: MultimodalSpec, limits: Mapping[str, int] | None = None, *, allow_embeds: bool = False
    ) -> None:
        self.spec = spec
        self.limits = dict(limits or {})
        self.allow_embeds = allow_embeds
        self.parts: list[MediaPart] = []

    def add(self, part: dict, part_type: str, where: str) -> MediaPart:
        """Read one media part (its type already known to be a media type)."""
        if part_type in PYTHON_ONLY_PARTS:
            raise _bad(
                f"{where}: '{part_type}' parts are not accepted over HTTP; send the media itself "
                "(an image_url, audio_url, video_url or input_audio part)."
            )
        kind, key = MEDIA_PARTS[part_type]
        if kind not in self.spec.modalities:
            raise _bad(f"This model does not accept {kind} inputs: {where} is a '{part_type}' part.")
        limit = self.limits.get(kind, DEFAULT_LIMIT)
        if sum(1 for item in self.parts if item.kind == kind) >= limit:
            raise _bad(f"At most {limit} {kind}(s) may be provided in one prompt.")
        value = part.get(key)
        if key == "image_embeds":
            if not self.allow_embeds:
                raise _bad(f"{where}: 'image_embeds' parts need the server flag --enable-mm-embeds.")
            if self.spec.embeds_hidden_size <= 0:
                raise _bad(f"{where}: this model does not take image embeddings.")
            if value is None:  # `embeds=None` would read as "not an embeddings part" downstream
                raise _bad(f"{where}.image_embeds must be a base64 string of torch.save bytes.")
            item = MediaPart(kind, where, embeds=value)
        elif key == "input_audio":
            if not isinstance(value, dict):
                raise _bad(f"{where}.input_audio must be an object with 'data' and 'format'.")
            item = MediaPart(kind, where, input_audio=value)
        else:
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise _bad(f"{where}.{key} must be a URL string or an object with a 'url' string.")
            item = MediaPart(kind, where, url=url)
        self.parts.append(item)
        return item

    def placeholder(self, kind: Modality) -> str:
        """The text a one-string template gets where an item goes (the model's placeholder token)."""
        if kind == "image":
            return self.spec.image_token
        return f"<{kind}>"

    def join_text(self, placeholders: list[str], texts: list[str]) -> str:
        """One string for a message (vLLM's rule): placeholders the text does not already hold go
        first, then the texts, joined by newlines."""
        text = "\n".join(texts)
        missing: list[str] = []
        for placeholder in dict.fromkeys(placeholders):
            wanted = placeholders.count(placeholder) - text.count(placeholder)
            missing.extend([placeholder] * max(0, wanted))
        return "\n".join([*missing, text]) if missing else text
