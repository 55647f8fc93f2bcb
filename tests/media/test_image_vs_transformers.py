"""The core's image pixels equal transformers' CLIP image processor's, bit for bit.

HF's `pixel_values` with rescaling and normalisation turned off are its 8-bit pixels after the RGB
conversion, resize and center crop: exactly what `protocol.media.image.decode_image` hands the
engine. (Outside tests/protocol, whose run may not import transformers.)
"""

from __future__ import annotations

import io

import numpy
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from protocol.media.image import decode_image
from protocol.media.spec import ImageProcessing
from tests.media_samples import image_bytes, random_image

HF = CLIPImageProcessorPil()


def hf_pixels(data: bytes, **options: object) -> numpy.ndarray:
    image = Image.open(io.BytesIO(data))  # as a user hands HF an opened file
    values = HF(image, do_rescale=False, do_normalize=False, return_tensors="np", **options)["pixel_values"][
        0
    ]
    assert values.dtype == numpy.uint8
    return numpy.moveaxis(values, 0, -1)


def our_pixels(data: bytes, processing: ImageProcessing) -> numpy.ndarray:
    decoded = decode_image(data, processing, where="messages[0].content[0]")
    return numpy.frombuffer(decoded.data, numpy.uint8).reshape(decoded.shape)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"])
@pytest.mark.parametrize("size", [(320, 240), (240, 321), (224, 224), (97, 500), (31, 17)])
def test_every_mode_and_size_matches_hf(mode, size):
    data = image_bytes(random_image(*size, mode=mode, seed=sum(size)), "TIFF" if mode == "CMYK" else "PNG")
    assert numpy.array_equal(our_pixels(data, ImageProcessing()), hf_pixels(data))


@pytest.mark.parametrize(
    "fmt, image, save",
    [
        ("JPEG", random_image(300, 200), {"quality": 80}),
        ("WEBP", random_image(300, 200), {}),
        ("GIF", random_image(300, 200).convert("P"), {}),
        ("BMP", random_image(300, 200).convert("1"), {}),
        ("PNG", random_image(300, 200, mode="L"), {"transparency": 7}),  # grey with a tRNS colour
        ("PNG", random_image(300, 200), {"transparency": (7, 7, 7)}),  # RGB with a tRNS colour
    ],
)
def test_other_formats_and_transparency_match_hf(fmt, image, save):
    data = image_bytes(image, fmt, **save)
    assert numpy.array_equal(our_pixels(data, ImageProcessing()), hf_pixels(data))


@pytest.mark.parametrize(
    "processing, options",
    [
        # a crop larger than the image: HF pads with zeros
        (ImageProcessing(do_resize=False), {"do_resize": False}),
        (
            ImageProcessing(do_resize=False, crop_height=224, crop_width=80),
            {"do_resize": False, "crop_size": {"height": 224, "width": 80}},
        ),
        # exact height x width, bilinear
        (
            ImageProcessing(shortest_edge=None, height=100, width=300, resample=2),
            {"size": {"height": 100, "width": 300}, "resample": 2},
        ),
        # LLaVA-1.5's 336 px
        (
            ImageProcessing(shortest_edge=336, crop_height=336, crop_width=336),
            {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
        ),
        (ImageProcessing(do_center_crop=False), {"do_center_crop": False}),
    ],
)
def test_resize_and_crop_settings_match_hf(processing, options):
    data = image_bytes(random_image(101, 51, mode="RGBA"))
    assert numpy.array_equal(our_pixels(data, processing), hf_pixels(data, **options))
