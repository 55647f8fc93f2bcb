"""From a prompt's media parts to the engine's `MediaInput`s: what to fetch, then decode and check.

`data:` URLs and `input_audio` carry their bytes and are decoded here; `http(s):` and `file:` URLs
are fetched by the runtime first (`requests()`), then decoded from what it fed back (`resolve`).
Every failure is a 400 that names the part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from protocol.engine_api import MediaInput
from protocol.errors import ProtocolError
from protocol.media.audio import decode_audio, decode_input_audio
from protocol.media.data_url import parse_data_url
from protocol.media.embeds import DecodedEmbeds, decode_image_embeds
from protocol.media.fetch import FetchResult, MediaFetchFailed, MediaRequest
from protocol.media.image import decode_image
from protocol.media.parts import MediaPart
from protocol.media.placement import Placement
from protocol.media.spec import MultimodalSpec

FETCHED_SCHEMES = ("http://", "https://", "file:")


def _inline(url: str) -> bool:
    return url[:5].lower() == "data:"  # schemes are case-insensitive


def _bad(message: str) -> ProtocolError:
    return ProtocolError(message, param="messages")


class MediaPlan:
    """A prompt's media parts, waiting for their placements (`place`) and their bytes (`resolve`).

    Image embeddings are decoded at once: their row count is their number of positions, which the
    prompt's placeholders need before anything is fetched."""

    def __init__(self, parts: Sequence[MediaPart], spec: MultimodalSpec) -> None:
        self.parts = list(parts)
        self.spec = spec
        self.placements: list[Placement] = []
        self._embeds: dict[int, DecodedEmbeds] = {}
        for index, part in enumerate(self.parts):  # an unusable URL is refused before anything is fetched
            url = part.url
            if url is not None and not _inline(url) and not url.lower().startswith(FETCHED_SCHEMES):
                raise _bad(f"{part.where}: the URL must be a data:, http(s): or file: URL.")
            if part.embeds is not None:
                self._embeds[index] = decode_image_embeds(part.embeds, spec.embeds_hidden_size, where=part.where)

    def lengths(self) -> list[int | None]:
        """Positions each part fills where the part sets them (embeddings), else None (the model's)."""
        return [self._embeds[i].shape[0] if i in self._embeds else None for i in range(len(self.parts))]

    def place(self, placements: Sequence[Placement]) -> None:
        if len(placements) != len(self.parts):
            raise ValueError("one placement per part")
        self.placements = list(placements)

    def requests(self) -> tuple[MediaRequest, ...]:
        """The URLs the runtime must fetch; `key` is the part's index."""
        return tuple(
            MediaRequest(index, part.url, part.kind)
            for index, part in enumerate(self.parts)
            if part.url is not None and not _inline(part.url)
        )

    def resolve(self, fetched: Sequence[FetchResult] = ()) -> tuple[MediaInput, ...]:
        """Decode every part (fetched ones from `fetched`); a 400 naming the first bad part."""
        by_key: Mapping[int, FetchResult] = {result.key: result for result in fetched}
        return tuple(
            self._decode(index, part, placement, by_key.get(index))
            for index, (part, placement) in enumerate(zip(self.parts, self.placements, strict=True))
        )

    def _decode(self, index: int, part: MediaPart, placement: Placement, fetched: FetchResult | None) -> MediaInput:
        offset, length = placement
        if part.embeds is not None:
            embeds = self._embeds[index]
            return MediaInput("image_embeds", embeds.hash, offset, length, embeds.data, embeds.shape)
        if part.input_audio is not None:
            audio = decode_input_audio(part.input_audio, self.spec.audio_sample_rate, where=part.where)
            return MediaInput("audio", audio.hash, offset, length, audio.data, audio.shape)
        assert part.url is not None
        if _inline(part.url):
            _, data = parse_data_url(part.url, part.kind, where=part.where)
        elif fetched is None:
            raise _bad(f"{part.where}: the media was not fetched.")
        elif isinstance(fetched, MediaFetchFailed):
            raise _bad(f"{part.where}: {fetched.message}")
        else:  # the server's Content-Type is not trusted either way (as vLLM): the bytes decide
            data = fetched.data
        if part.kind == "image":
            image = decode_image(data, self.spec.image, where=part.where)
            return MediaInput("image", image.hash, offset, length, image.data, image.shape)
        if part.kind == "audio":
            audio = decode_audio(data, self.spec.audio_sample_rate, where=part.where)
            return MediaInput("audio", audio.hash, offset, length, audio.data, audio.shape)
        raise _bad(f"{part.where}: this model does not accept {part.kind} inputs.")
