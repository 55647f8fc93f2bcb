"""The runner's media rows: each image embedded once, whole, and sliced into the chunks that need it."""

import hashlib

import torch

from engine.attention import SequenceSpan
from engine.media_embeddings import MediaEmbedder
from protocol.engine_api import MediaInput

TOKENS = 6  # embeddings per image
HIDDEN = 3


class CountingVisionModel:
    """Each image's embeddings are its first pixel value plus the row index, so slices are checkable."""

    def __init__(self):
        self.images_embedded = 0

    def pixel_values(self, data: bytes, shape):
        return torch.tensor(list(data), dtype=torch.float32).reshape(shape).permute(2, 0, 1)

    def embed_images(self, pixel_values):
        self.images_embedded += pixel_values.shape[0]
        first = pixel_values[:, 0, 0, 0]
        rows = torch.arange(TOKENS, dtype=torch.float32)
        return (first[:, None, None] + rows[None, :, None]).expand(-1, -1, HIDDEN).clone()


def image(value: int, offset: int) -> MediaInput:
    data = bytes([value]) * 12
    return MediaInput("image", hashlib.sha256(data).hexdigest(), offset, TOKENS, data, (2, 2, 3))


def span(start: int, length: int, media) -> SequenceSpan:
    return SequenceSpan([0] * length, start, [0], media)


def test_chunks_get_their_rows_of_an_image_embedded_once():
    model = CountingVisionModel()
    embedder = MediaEmbedder(model)
    item = image(100, offset=2)  # positions 2..7
    rows, values = embedder.step_embeds([span(0, 5, [item])])  # positions 0..4: image rows 0..2
    assert rows.tolist() == [2, 3, 4]
    assert values[:, 0].tolist() == [100, 101, 102]
    rows, values = embedder.step_embeds([span(5, 5, [item])])  # positions 5..9: image rows 3..5
    assert rows.tolist() == [0, 1, 2]
    assert values[:, 0].tolist() == [103, 104, 105]
    assert model.images_embedded == 1


def test_rows_are_placed_across_the_spans_of_a_step():
    model = CountingVisionModel()
    embedder = MediaEmbedder(model)
    first, second = image(10, offset=0), image(50, offset=1)
    text_only = span(0, 4, [])
    rows, values = embedder.step_embeds([text_only, span(0, 8, [first]), span(0, 3, [second])])
    assert rows.tolist() == [4, 5, 6, 7, 8, 9] + [13, 14]
    assert values[:, 0].tolist() == [10, 11, 12, 13, 14, 15, 50, 51]
    assert model.images_embedded == 2  # one batch for both


def test_a_step_without_media_rows_embeds_nothing():
    model = CountingVisionModel()
    embedder = MediaEmbedder(model)
    decode = span(20, 1, [image(1, offset=0)])  # the image is long computed
    assert embedder.step_embeds([decode, span(0, 3, [])]) is None
    assert model.images_embedded == 0


def test_the_cache_is_bounded_but_never_drops_what_a_step_uses():
    model = CountingVisionModel()
    embedder = MediaEmbedder(model, max_cached_items=2)
    items = [image(v, offset=0) for v in (1, 2, 3)]
    rows, values = embedder.step_embeds([span(0, TOKENS, [item]) for item in items])
    assert values[:, 0].tolist() == [v + r for v in (1, 2, 3) for r in range(TOKENS)]
    embedder.step_embeds([span(0, TOKENS, [item]) for item in items])  # all three still running: all kept
    assert model.images_embedded == 3
    embedder.step_embeds([span(0, TOKENS, [items[0]])])  # only the first runs on: back to the bound
    embedder.step_embeds([span(0, TOKENS, [items[1]])])  # the least recent was dropped: embedded again
    assert model.images_embedded == 4
