"""Media decoding in the core: data URLs, images, audio and video from bytes to what the model sees,
and a 400 naming the content part for anything bad (never another exception, never noise).

Pixel equality with transformers' CLIP processor is in tests/media/ (this folder runs without it).
"""

from __future__ import annotations

import base64
import io
import logging
import struct
import warnings
import wave

import numpy
import pytest
from PIL import Image

from protocol.errors import ProtocolError
from protocol.media import audio as audio_module
from protocol.media.audio import decode_audio, decode_input_audio
from protocol.media.data_url import check_media_type, decode_base64, parse_data_url
from protocol.media.decoding import DECODE_ERRORS, open_container
from protocol.media.image import decode_image
from protocol.media.spec import ImageProcessing
from protocol.media.video import decode_video, sample_indices
from tests.media_samples import (
    audio_bytes,
    frame_colour,
    image_bytes,
    png_with_size,
    random_image,
    sine,
    video_bytes,
)

WHERE = "messages[0].content[1]"
CLIP = ImageProcessing()
AS_IS = ImageProcessing(do_resize=False, do_center_crop=False)


def refused(call, *args, **kwargs) -> ProtocolError:
    """The ProtocolError `call` raises: a 400 on `messages` that names the part."""
    with pytest.raises(ProtocolError) as caught:
        call(*args, **kwargs)
    error = caught.value
    assert (error.status, error.param) == (400, "messages")
    assert WHERE in error.message
    return error


def pixels(decoded) -> numpy.ndarray:
    return numpy.frombuffer(decoded.data, numpy.uint8).reshape(decoded.shape)


def samples(decoded) -> numpy.ndarray:
    return numpy.frombuffer(decoded.data, "<f4")


# ---------------------------------------------------------------------------------------------
# data URLs


def test_a_base64_data_url_gives_its_mime_type_and_bytes():
    png = image_bytes(random_image(4, 4))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert parse_data_url(url, "image", where=WHERE) == ("image/png", png)


@pytest.mark.parametrize(
    "url",
    [
        "DATA:Image/PNG;BASE64,aGVsbG8=",  # scheme, type and ;base64 in any case
        "data:image/png;charset=binary;name=a.png;base64,aGVsbG8=",  # parameters before ;base64
        "data:image/png;base64,aGVs\r\nbG8=",  # line breaks, as MIME encoders write them
        "data:image/png;base64, aGVs bG8",  # spaces, and the padding left out
        "data:image/png;base64,aGVs%62G8%3D",  # percent-encoded, as browsers accept
    ],
)
def test_data_urls_are_read_as_browsers_read_them(url):
    assert parse_data_url(url, "image", where=WHERE) == ("image/png", b"hello")


def test_a_payload_without_base64_is_percent_decoded():
    assert parse_data_url("data:,a%20b%FF", "audio", where=WHERE) == (None, b"a b\xff")


@pytest.mark.parametrize("mime", ["", "application/octet-stream"])
@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_an_unknown_mime_type_passes_to_be_sniffed(mime, kind):
    assert parse_data_url(f"data:{mime};base64,AAAA", kind, where=WHERE)[1] == b"\x00\x00\x00"


@pytest.mark.parametrize(
    "mime, kind",
    [("video/mp4", "audio"), ("video/webm", "audio"), ("application/ogg", "audio"), ("image/gif", "video")],
)
def test_containers_named_for_another_kind_may_carry_audio_or_video(mime, kind):
    check_media_type(mime, kind, where=WHERE)


@pytest.mark.parametrize(
    "url, kind, says",
    [
        ("data:text/plain;base64,aGVsbG8=", "image", "'text/plain' is not an image type"),
        ("data:audio/wav;base64,aGVsbG8=", "image", "not an image type"),
        ("data:image/png;base64,aGVsbG8=", "audio", "not an audio type"),
        ("data:audio/mpeg;base64,aGVsbG8=", "video", "not a video type"),
        ("data:image/png;base64", "image", "no ','"),
        ("https://example.com/a.png", "image", "does not start with 'data:'"),
        ("image/png;base64,aGVsbG8=", "image", "does not start with 'data:'"),
        ("data:image;base64,aGVsbG8=", "image", "is not a MIME type"),
        ("data:image/png;base64,aGVs@G8=", "image", "outside the base64 alphabet"),
        ("data:image/png;base64,aGVs-G8_", "image", "outside the base64 alphabet"),  # URL-safe base64
        ("data:image/png;base64,aGVsb", "image", "no padding can fix"),
        ("data:image/png;base64,aGVsbG8===", "image", "outside the base64 alphabet"),
        ("data:image/png;base64,aGVsbG8é", "image", "outside the base64 alphabet"),
        ("data:image/png,\ud800", "image", "not valid Unicode"),
    ],
)
def test_malformed_data_urls_are_refused(url, kind, says):
    assert says in refused(parse_data_url, url, kind, where=WHERE).message


def test_a_servers_content_type_is_checked_with_its_parameters_ignored():
    check_media_type("image/png; charset=binary", "image", where=WHERE)
    assert (
        "not an image type"
        in refused(check_media_type, "text/html; charset=utf-8", "image", where=WHERE).message
    )


def test_base64_outside_a_url_is_decoded_the_same_way():
    assert decode_base64("aGVs\nbG8", where=WHERE) == b"hello"
    refused(decode_base64, "aGVsbG8é", where=WHERE)


# ---------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"])
@pytest.mark.parametrize("size", [(320, 240), (240, 320), (224, 224), (97, 500)])
def test_images_of_every_mode_and_size_become_the_models_crop(mode, size):
    data = image_bytes(random_image(*size, mode=mode), "TIFF" if mode == "CMYK" else "PNG")
    decoded = decode_image(data, CLIP, where=WHERE)
    assert decoded.shape == (224, 224, 3)
    assert len(decoded.data) == 224 * 224 * 3 and len(decoded.hash) == 64


def test_transparency_is_composited_onto_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent
    rgba.putpixel((1, 0), (10, 20, 30, 255))  # opaque
    assert pixels(decode_image(image_bytes(rgba), AS_IS, where=WHERE)).tolist() == [
        [[255, 255, 255], [10, 20, 30]]
    ]


def test_a_palette_images_transparent_index_becomes_white():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.putpixel((1, 0), 1)
    decoded = decode_image(image_bytes(palette, transparency=0), AS_IS, where=WHERE)
    assert pixels(decoded).tolist() == [[[255, 255, 255], [200, 0, 0]]]


@pytest.mark.parametrize(
    "size, shape",
    [
        ((448, 300), (224, 334, 3)),  # int(224 * 448 / 300) = int(334.9): truncated, as HF does
        ((300, 448), (334, 224, 3)),
        ((100, 100), (224, 224, 3)),  # upscaled
        ((1000, 224), (224, 1000, 3)),  # already the right short side
    ],
)
def test_the_short_side_is_resized_as_hf_does(size, shape):
    processing = ImageProcessing(do_center_crop=False)
    assert decode_image(image_bytes(random_image(*size)), processing, where=WHERE).shape == shape


def test_a_fixed_size_resize():
    processing = ImageProcessing(shortest_edge=None, height=30, width=50, do_center_crop=False)
    assert decode_image(image_bytes(random_image(7, 9)), processing, where=WHERE).shape == (30, 50, 3)


def test_a_crop_larger_than_the_image_pads_it_with_black():
    image = Image.new("RGB", (6, 4), (200, 100, 50))
    processing = ImageProcessing(do_resize=False, crop_height=8, crop_width=9)
    result = pixels(decode_image(image_bytes(image), processing, where=WHERE))
    assert result.shape == (8, 9, 3)
    # HF's offsets: top = (4 - 8) // 2 = -2, left = (6 - 9) // 2 = -2; the image sits at [2:6, 2:8]
    assert (result[2:6, 2:8] == (200, 100, 50)).all()
    assert (
        result[:2].sum() == 0
        and result[6:].sum() == 0
        and result[:, :2].sum() == 0
        and result[:, 8:].sum() == 0
    )


def test_equal_pixels_have_equal_hashes_whatever_the_container():
    image = random_image(50, 40)
    hashes = {decode_image(image_bytes(image, fmt), CLIP, where=WHERE).hash for fmt in ("PNG", "BMP", "TIFF")}
    assert len(hashes) == 1
    assert decode_image(image_bytes(random_image(50, 40, seed=1)), CLIP, where=WHERE).hash not in hashes


def test_only_the_first_frame_of_an_animated_image_is_used():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    for fmt in ("GIF", "PNG", "WEBP"):
        data = image_bytes(red, fmt, save_all=True, append_images=[blue], lossless=True)
        assert pixels(decode_image(data, AS_IS, where=WHERE))[4, 4].tolist() == [255, 0, 0], fmt


def test_exif_orientation_is_not_applied_as_hf_does_not():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    data = image_bytes(random_image(40, 20), "JPEG", exif=exif)
    assert decode_image(data, AS_IS, where=WHERE).shape == (20, 40, 3)


def test_jpeg_and_webp_decode():
    for fmt in ("JPEG", "WEBP"):
        assert decode_image(image_bytes(random_image(300, 200), fmt), CLIP, where=WHERE).shape == (
            224,
            224,
            3,
        )


PNG = image_bytes(random_image(64, 64))
JPEG = image_bytes(random_image(64, 64), "JPEG")
GIF = image_bytes(random_image(64, 64).convert("P"), "GIF")


@pytest.mark.parametrize(
    "data, says",
    [
        (b"", "the data is empty"),
        (b"Hello, this is some text and not an image.", "not a valid image"),
        (PNG[: len(PNG) // 2], "the PNG data is truncated or corrupt"),
        (JPEG[: len(JPEG) // 2], "the JPEG data is truncated or corrupt"),
        (GIF[: len(GIF) // 2], "the GIF data is truncated or corrupt"),
        (PNG[:30], "not a valid image"),
        (png_with_size(0, 0), "not a valid image"),  # Pillow refuses zero sizes itself
        (png_with_size(0, 10), "not a valid image"),
        (png_with_size(100_000, 100_000), "decompression bomb"),  # over twice Pillow's limit: its error
        (png_with_size(10_000, 10_000), "decompression bomb"),  # over Pillow's limit: its warning
        (png_with_size(9_000, 9_000), "9000x9000 pixels is over the limit of 67108864 pixels"),  # ours
        (image_bytes(random_image(8, 8), "TGA"), "not a valid image"),  # a format we do not open
        (image_bytes(Image.new("L", (1, 70_000))), "aspect ratio (1x70000) is too extreme"),
    ],
)
def test_bad_images_are_refused(data, says):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert says in refused(decode_image, data, CLIP, where=WHERE).message
    assert not caught  # Pillow's warnings (the bomb warning too) stay inside


def test_a_malformed_tiff_leaves_the_server_log_alone(caplog):
    tiff = bytearray(image_bytes(Image.new("RGB", (4, 4)), "TIFF"))
    at = tiff.index(struct.pack("<HHI", 0x115, 3, 1))  # SamplesPerPixel, SHORT, one value
    tiff[at + 8 : at + 10] = struct.pack("<H", 0xFFFF)
    with caplog.at_level(logging.DEBUG):
        refused(decode_image, bytes(tiff), CLIP, where=WHERE)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_the_pixel_limit_is_the_callers():
    data = image_bytes(random_image(20, 20))
    assert (
        "over the limit of 399 pixels"
        in refused(decode_image, data, CLIP, where=WHERE, max_pixels=399).message
    )


# ---------------------------------------------------------------------------------------------
# audio


def best_correlation(decoded: numpy.ndarray, expected: numpy.ndarray, max_lag: int = 2048) -> float:
    """The highest correlation of `decoded` with `expected` shifted by up to `max_lag` samples (codec delay)."""
    n = min(len(decoded), len(expected)) - max_lag
    return max(numpy.corrcoef(decoded[lag : lag + n], expected[:n])[0, 1] for lag in range(0, max_lag, 7))


# name: (input rate, channels, samples of slack at 16 kHz: a codec's priming and padding frames)
AUDIO = {
    "wav": (44100, 1, 1),
    "flac": (44100, 1, 1),
    "mp3": (44100, 1, 1200),
    "ogg": (44100, 2, 1200),  # FFmpeg's own Vorbis encoder writes stereo only
    "opus": (48000, 1, 1200),
    "webm": (48000, 1, 1200),
    "m4a": (44100, 1, 1200),
}


@pytest.mark.parametrize("name", list(AUDIO))
def test_audio_in_every_container_decodes_to_mono_at_the_models_rate(name):
    rate, channels, slack = AUDIO[name]
    tone = sine(rate, 1.0)
    decoded = decode_audio(audio_bytes(numpy.stack([tone] * channels), rate, name), 16000, where=WHERE)
    assert decoded.shape == (len(decoded.data) // 4,)
    assert abs(decoded.shape[0] - 16000) <= slack
    assert best_correlation(samples(decoded), sine(16000, 1.0)) > 0.99
    assert len(decoded.hash) == 64


def pcm_wav(tone: numpy.ndarray, rate: int = 16000) -> bytes:
    """16-bit mono WAV with the plain 44-byte header (no metadata chunks)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(rate)
        out.writeframes((tone * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def test_pcm_at_the_models_rate_comes_through_unchanged():
    tone = sine(16000, 0.5)
    expected = (tone * 32767).astype("<i2").astype(numpy.float32) / 32768
    assert numpy.array_equal(samples(decode_audio(pcm_wav(tone), 16000, where=WHERE)), expected)


def test_resampling_keeps_the_duration_and_the_pitch():
    decoded = decode_audio(audio_bytes(numpy.stack([sine(44100, 2.0)]), 44100), 16000, where=WHERE)
    assert decoded.shape == (32000,)
    assert best_correlation(samples(decoded), sine(16000, 2.0), max_lag=64) > 0.999


def test_stereo_is_downmixed_to_the_mean_of_its_channels():
    tone = sine(16000, 1.0)
    decoded = samples(
        decode_audio(audio_bytes(numpy.stack([tone, numpy.zeros_like(tone)]), 16000), 16000, where=WHERE)
    )
    assert numpy.allclose(decoded, tone / 2, atol=1e-4)


def test_equal_samples_have_equal_hashes_whatever_the_container():
    tone = numpy.stack([sine(22050, 0.5)])
    hashes = {
        decode_audio(audio_bytes(tone, 22050, name), 16000, where=WHERE).hash for name in ("wav", "flac")
    }
    assert len(hashes) == 1
    assert decode_audio(audio_bytes(tone, 22050, "wav"), 24000, where=WHERE).hash not in hashes


def test_audio_over_the_time_limit_is_refused():
    data = audio_bytes(numpy.stack([sine(16000, 3.0)]), 16000)
    assert decode_audio(data, 16000, where=WHERE, max_seconds=3.0).shape == (48000,)
    assert (
        "longer than the limit of 2.5 s"
        in refused(decode_audio, data, 16000, where=WHERE, max_seconds=2.5).message
    )


def test_the_time_limit_stops_decoding_early(monkeypatch):
    chunks = 0
    mono_chunks = audio_module._mono_chunks

    def counting(*args):
        nonlocal chunks
        for chunk in mono_chunks(*args):
            chunks += 1
            yield chunk

    monkeypatch.setattr(audio_module, "_mono_chunks", counting)
    decode_audio(pcm_wav(sine(16000, 1.0)), 16000, where=WHERE)
    per_second = chunks
    chunks = 0
    long = pcm_wav(numpy.zeros(16000 * 60))
    assert "limit of 1 s" in refused(decode_audio, long, 16000, where=WHERE, max_seconds=1).message
    assert chunks <= 2 * per_second  # not the 60 seconds' worth


WAV = pcm_wav(sine(16000, 0.5))
MP3 = audio_bytes(numpy.stack([sine(44100, 0.5)]), 44100, "mp3")


@pytest.mark.parametrize(
    "data, says",
    [
        (b"", "the data is empty"),
        (b"This is plain text, not a recording. " * 4, "not audio in a supported format"),
        (WAV[:30], "truncated or corrupt"),  # cut inside the header
        (MP3[:100], "truncated or corrupt"),
        (PNG, "not audio in a supported format"),
        (video_bytes(4), "no audio stream"),
        (pcm_wav(numpy.zeros(0)), "no audio samples"),
        # a playlist would make FFmpeg open other files: not an allowed container
        (
            b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n",
            "not audio",
        ),
        (b"ffconcat version 1.0\nfile /etc/hostname\n", "not audio"),
    ],
)
def test_bad_audio_is_refused(data, says, capfd):
    assert says in refused(decode_audio, data, 16000, where=WHERE).message
    assert capfd.readouterr() == ("", "")  # FFmpeg's log stays silent


def test_a_playlist_cannot_make_the_decoder_read_a_file(tmp_path, monkeypatch):
    (tmp_path / "secret.wav").write_bytes(WAV)
    monkeypatch.chdir(tmp_path)
    playlist = b"ffconcat version 1.0\nfile secret.wav\n"  # plain FFmpeg would read ./secret.wav
    assert "not audio" in refused(decode_audio, playlist, 16000, where=WHERE).message
    # and were the concat demuxer allowed, the protocol whitelist still refuses the nested open
    with pytest.raises(DECODE_ERRORS):
        with open_container(playlist, ("concat",)) as container:
            list(container.decode(audio=0))


def test_audio_cut_inside_its_samples_gives_the_samples_present():
    # PCM has no framing to tell a cut from an end: like players (and librosa), keep what is there
    assert decode_audio(WAV[: 44 + 2 * 4000], 16000, where=WHERE).shape == (4000,)


def test_an_input_audio_part_is_base64_with_a_format():
    value = {"data": base64.b64encode(WAV).decode(), "format": "wav"}
    assert decode_input_audio(value, 16000, where=WHERE).shape == (8000,)
    del value["format"]  # the container is recognised from the data
    assert decode_input_audio(value, 16000, where=WHERE).shape == (8000,)


@pytest.mark.parametrize(
    "value, says",
    [
        ("UklGRg==", "must be an object"),
        ({"format": "wav"}, "'input_audio.data' must be a non-empty base64 string"),
        ({"data": 12, "format": "wav"}, "'input_audio.data' must be"),
        ({"data": "", "format": "wav"}, "'input_audio.data' must be"),
        ({"data": "UklGRg==", "format": "exe"}, "'input_audio.format' must be one of"),
        ({"data": "UklGRg==", "format": 3}, "'input_audio.format' must be one of"),
        ({"data": "not base64!", "format": "wav"}, "outside the base64 alphabet"),
        ({"data": "UklGRg==", "format": "wav"}, "truncated or corrupt"),
    ],
)
def test_bad_input_audio_parts_are_refused(value, says):
    assert says in refused(decode_input_audio, value, 16000, where=WHERE).message


# ---------------------------------------------------------------------------------------------
# video


@pytest.mark.parametrize("total, wanted", [(40, 8), (17, 16), (1000, 16), (3, 1), (100, 2)])
def test_frames_are_sampled_as_vllm_samples_them(total, wanted):
    assert sample_indices(total, wanted) == numpy.linspace(0, total - 1, wanted).astype(int).tolist()


def test_short_videos_keep_every_frame():
    assert sample_indices(5, 16) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", ["mp4", "webm", "avi", "mkv", "gif"])
def test_videos_decode_to_evenly_sampled_rgb_frames(name):
    decoded = decode_video(video_bytes(40, name=name), where=WHERE, num_frames=8)
    assert decoded.shape == (8, 48, 64, 3)
    frames = pixels(decoded)
    centre_red = frames[:, 24, 32, 0].astype(int)
    expected = [frame_colour(i)[0] for i in sample_indices(40, 8)]
    tolerance = 40 if name == "gif" else 12  # GIF's palette is coarse, the others are lossy
    assert numpy.abs(centre_red - expected).max() <= tolerance, (centre_red, expected)


def test_a_short_video_gives_all_its_frames():
    assert decode_video(video_bytes(5), where=WHERE, num_frames=16).shape == (5, 48, 64, 3)


def test_equal_frames_have_equal_hashes():
    first, second = (decode_video(video_bytes(20, name="mkv"), where=WHERE, num_frames=4) for _ in range(2))
    assert first.hash == second.hash
    assert decode_video(video_bytes(21, name="mkv"), where=WHERE, num_frames=4).hash != first.hash


MP4 = video_bytes(40)


@pytest.mark.parametrize(
    "data, limits, says",
    [
        (b"", {}, "the data is empty"),
        (MP4[: len(MP4) // 2], {}, "truncated or corrupt"),  # the index (moov) is at the end
        (MP4[:100], {}, "truncated or corrupt"),
        (b"Not a video at all. " * 10, {}, "not a video in a supported format"),
        (PNG, {}, "not a video in a supported format"),
        (audio_bytes(numpy.stack([sine(48000, 0.2)]), 48000, "webm"), {}, "no video stream"),
        (MP4, {"max_pixels_per_frame": 64 * 47}, "64x48 frames are over the limit of 3008 pixels"),
        (MP4, {"max_frames": 39}, "more than 39 frames"),
    ],
)
def test_bad_videos_are_refused(data, limits, says, capfd):
    assert says in refused(decode_video, data, where=WHERE, **limits).message
    assert capfd.readouterr() == ("", "")
