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
    """A prompt's media parts with their placements, waiting for their bytes."""

    def __init__(self, parts: Sequence[MediaPart], placements: Sequence[Placement], spec: MultimodalSpec) -> None:
        if len(parts) != len(placements):
            raise ValueError("one placement per part")
        self.parts = list(parts)
        self.placements = list(placements)
        self.spec = spec
        for part in self.parts:  # an unusable URL is refused before anything is fetched
            url = part.url
            if url is not None and not _inline(url) and not url.lower().startswith(FETCHED_SCHEMES):
                raise _bad(f"{part.where}: the URL must be a data:, http(s): or file: URL.")

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
            self._decode(part, placement, by_key.get(index))
            for index, (part, placement) in enumerate(zip(self.parts, self.placements, strict=True))
        )

    def _decode(self, part: MediaPart, placement: Placement, fetched: FetchResult | None) -> MediaInput:
        offset, length = placement
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
