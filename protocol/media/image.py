"""Images in prompts: bytes to the 8-bit RGB pixels an HF CLIP-style processor feeds its model.

Why Pillow: it is what transformers' image processors (PIL backend) and vLLM decode with, so
decoding, the RGB conversion and the resampling filters are the same code, and our pixels equal
HF's bit for bit (tests/media/test_image_vs_transformers.py checks that). It is pure CPU work without IO.

What happens, in HF's order (`PilBackend.process_image` and `_preprocess`):

1. Open with the formats clients send (PNG, JPEG, GIF, WebP, BMP, TIFF; not the headerless or
   exotic ones Pillow also sniffs, such as TGA or EPS, which would turn random bytes into images or
   run Ghostscript). Only the first frame of an animated image is used.
2. Size checks before any pixel is decoded: zero-sized images and images over `max_pixels` are
   refused (a decompression bomb is a small file with a huge header). Pillow's own
   DecompressionBombWarning/Error become the same 400.
3. `load()` the whole frame: truncated files fail (LOAD_TRUNCATED_IMAGES stays off).
4. HF's `convert_to_rgb`: an image with alpha (an `A` band or a `transparency` entry, as in P, L or
   RGB PNGs with tRNS) is composited onto white, anything else goes through `convert("RGB")`.
   With `do_convert_rgb` off (HF then passes other modes on as they are, which a 3-channel model
   cannot take) the image still becomes RGB, by plain `convert("RGB")`, alpha dropped.
   EXIF orientation is not applied: HF's image processors do not apply it to the images they are
   given, and the pixels must be theirs.
5. Resize: `shortest_edge` like HF's `get_resize_output_image_size` (the short side becomes n,
   the long one `int(n * long / short)`), or exactly `height` x `width`; with Pillow's filter.
6. Center crop like HF's `center_crop`: the window starts at `(size - crop) // 2`, and where it
   reaches outside the image (a crop larger than the image) the pixels are zero (black), which is
   what Pillow's `crop` fills in.
"""

from __future__ import annotations

import io
import logging
import warnings

import msgspec
from PIL import Image

from protocol.media.decoding import DECODE_ERRORS, content_hash, invalid
from protocol.media.spec import ImageProcessing

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# 64 Mi pixels: room for 48 MP phone photos and 8K x 8K, under Pillow's bomb limit (~89 M), and a
# bound on memory (4 bytes a pixel while converting, so at most 256 MiB per image).
MAX_PIXELS = 64 * 1024 * 1024

# Pillow's TIFF reader logs an ERROR for one kind of malformed file before raising (which becomes
# our 400): a client's bad upload is not a server error, so it stays out of the server's log.
logging.getLogger("PIL.TiffImagePlugin").setLevel(logging.CRITICAL)


class DecodedImage(msgspec.Struct, frozen=True):
    """uint8 RGB pixels, row-major `shape == (height, width, 3)`, after the model's resize and crop."""

    data: bytes
    shape: tuple[int, int, int]
    hash: str


def decode_image(
    data: bytes, processing: ImageProcessing, *, where: str, max_pixels: int = MAX_PIXELS
) -> DecodedImage:
    """Decode, check, convert to RGB, resize and crop one image; a 400 naming `where` if it is bad."""
    if not data:
        raise invalid("image", where, "the data is empty.")
    with warnings.catch_warnings():
        # Pillow warns about odd metadata and palettes; that is noise for a server. A bomb warning
        # (over MAX_IMAGE_PIXELS) becomes an error, refused below like our own size limit.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open(data, where)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise invalid("image", where, f"it has no pixels ({width}x{height}).")
        if width * height > max_pixels:
            raise invalid(
                "image", where, f"{width}x{height} pixels is over the limit of {max_pixels} pixels."
            )
        try:
            image.load()
            rgb = _convert_to_rgb(image) if processing.do_convert_rgb else image.convert("RGB")
        except DECODE_ERRORS:
            raise invalid("image", where, f"the {image.format} data is truncated or corrupt.") from None
    rgb = _resize(rgb, processing, where, max_pixels)
    if processing.do_center_crop:
        rgb = _center_crop(rgb, processing.crop_height, processing.crop_width)
    pixels = rgb.tobytes()
    shape = (rgb.height, rgb.width, 3)
    return DecodedImage(data=pixels, shape=shape, hash=content_hash("image/uint8", shape, pixels))


def _open(data: bytes, where: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise invalid(
            "image", where, f"the data is not a valid image in a supported format ({', '.join(FORMATS)})."
        ) from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise invalid("image", where, "its dimensions are too large (a decompression bomb?).") from None
    except DECODE_ERRORS:
        raise invalid("image", where, "the image data is corrupt.") from None


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` (image_transforms.py): transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _resize(image: Image.Image, processing: ImageProcessing, where: str, max_pixels: int) -> Image.Image:
    if not processing.do_resize:
        return image
    if processing.shortest_edge:
        size = processing.shortest_edge
        short, long = sorted(image.size)
        new_short, new_long = size, int(size * long / short)
        width, height = (new_short, new_long) if image.width <= image.height else (new_long, new_short)
    elif processing.height and processing.width:
        width, height = processing.width, processing.height
    else:
        return image
    if width * height > max_pixels:  # a 1x100000 strip would become 224x22400000
        raise invalid(
            "image", where, f"its aspect ratio ({image.width}x{image.height}) is too extreme to resize."
        )
    return image.resize((width, height), resample=processing.resample)


def _center_crop(image: Image.Image, crop_height: int, crop_width: int) -> Image.Image:
    """HF's `center_crop`: Python's floor division for the offsets, zeros outside the image."""
    top = (image.height - crop_height) // 2
    left = (image.width - crop_width) // 2
    if (top, left) == (0, 0) and image.size == (crop_width, crop_height):
        return image
    return image.crop((left, top, left + crop_width, top + crop_height))
