"""Speech to text through the Sans-IO core: uploads in, the windows' `Generate`s out, and scripted
engine events back to every response format a client can ask for.

A test plays runtime and engine: it posts a multipart form (built by httpx, as the openai client
does), looks at the engine work the call submits, feeds `Tokens` for each window and reads the
answer. The official `openai` client is also run against the core through an httpx mock transport.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import warnings
import wave

import httpx
import numpy
import openai
import pytest

from protocol import Abort, App, AppConfig, Failed, Generate, Tokens
from protocol.engine_api import TokenLogprobs
from protocol.testing import (
    END_OF_TEXT_ID,
    LANGUAGE_IDS,
    NO_TIMESTAMPS_ID,
    START_OF_PREV_ID,
    START_OF_TRANSCRIPT_ID,
    TRANSCRIBE_ID,
    TRANSLATE_ID,
    timestamp_id,
    tiny_served_model,
    tiny_speech_model,
)
from protocol.testing import CallPlayer as Runtime
from tests.media_samples import audio_bytes, sine

RATE = 16000
WINDOW = 30 * RATE
TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"


def wav(seconds: float, rate: int = RATE, channels: int = 1) -> bytes:
    """A 440 Hz tone as 16-bit PCM WAV (the stdlib writer: fast for long files)."""
    t = numpy.arange(int(round(seconds * rate))) / rate
    tone = (0.3 * numpy.sin(2 * numpy.pi * 440 * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as sink:
        sink.setnchannels(channels)
        sink.setsampwidth(2)
        sink.setframerate(rate)
        sink.writeframes(numpy.repeat(tone, channels).tobytes())
    return buffer.getvalue()


WAV_5S = wav(5.0)


def make_app(models=None, **config) -> App:
    ids = itertools.count(1)
    return App(AppConfig(**config), models or [tiny_speech_model()], clock=lambda: 1_700_000_000.0, new_id=lambda: f"r{next(ids)}")  # fmt: skip


def form(files=None, data=None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a multipart form as httpx (the openai client's transport) writes it."""
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return [(b"content-type", request.headers["content-type"].encode())], request.read()


def post(
    audio: bytes | None = WAV_5S, *, app=None, path=TRANSCRIPTIONS, filename="a.wav", **fields
) -> Runtime:
    app = app or make_app()
    files = {"file": (filename, audio, "audio/wav")} if audio is not None else None
    headers, body = form(files, {name: value for name, value in fields.items() if value is not None})
    return Runtime(app.handle("POST", path, headers, body))


def tokens(generate: Generate, ids, finish="stop", logprob: float | None = None) -> Tokens:
    entries = None if logprob is None else tuple(TokenLogprobs(t, logprob, 1) for t in ids)
    return Tokens(
        request_id=generate.request_id,
        index=0,
        token_ids=tuple(ids),
        num_prompt_tokens=len(generate.prompt_token_ids),
        finish_reason=finish,
        logprobs=entries,
    )


def text_ids(text: str) -> list[int]:
    return list(text.encode())


def timed(*pieces) -> list[int]:
    """Whisper-style output: floats are timestamps (seconds into the window), strings are text."""
    ids: list[int] = []
    for piece in pieces:
        ids += [timestamp_id(piece)] if isinstance(piece, float) else text_ids(piece)
    return [*ids, END_OF_TEXT_ID]


# ---- the engine work ----


def test_a_short_upload_is_one_window_with_whispers_prompt():
    runtime = post(language="fr")
    (generate,) = runtime.generates
    fr = LANGUAGE_IDS["fr"]
    assert generate.prompt_token_ids == (START_OF_TRANSCRIPT_ID, fr, TRANSCRIBE_ID, NO_TIMESTAMPS_ID)
    assert generate.params.max_tokens == 448 - 4 and generate.params.temperature == 0.0
    assert generate.params.logprobs is None
    (media,) = generate.media
    assert media.kind == "audio" and media.shape == (5 * RATE,) and media.offset == media.length == 0
    samples = numpy.frombuffer(media.data, dtype="<f4")
    assert len(samples) == 5 * RATE and 0.25 < numpy.abs(samples).max() < 0.35  # the tone, as float32
    assert runtime.call.model == "tiny-speech-model" and runtime.status is None  # nothing sent yet


def test_an_english_only_model_gets_no_language_or_task_token():
    runtime = post(app=make_app([tiny_speech_model(multilingual=False)]))
    assert runtime.generates[0].prompt_token_ids == (START_OF_TRANSCRIPT_ID, NO_TIMESTAMPS_ID)
    assert post(app=make_app([tiny_speech_model(multilingual=False)]), language="EN").generates
    error = post(app=make_app([tiny_speech_model(multilingual=False)]), language="fr").error()
    assert error["param"] == "language" and "English-only" in error["message"]
    error = post(app=make_app([tiny_speech_model(multilingual=False)]), path=TRANSLATIONS).error()
    assert error["param"] == "model" and "cannot translate" in error["message"]


def test_translation_prompt_and_to_language():
    runtime = post(path=TRANSLATIONS, language="de", to_language="en")
    assert runtime.generates[0].prompt_token_ids == (
        START_OF_TRANSCRIPT_ID,
        LANGUAGE_IDS["de"],
        TRANSLATE_ID,
        NO_TIMESTAMPS_ID,
    )
    assert runtime.generates[0].request_id.startswith("trsl-")
    runtime.feed(tokens(runtime.generates[0], text_ids(" Good morning.") + [END_OF_TEXT_ID]))
    assert runtime.json() == {"text": "Good morning."}  # OpenAI's translation object: text only
    error = post(path=TRANSLATIONS, language="de", to_language="fr").error()
    assert error["param"] == "to_language" and "English only" in error["message"]


def test_a_prompt_follows_startofprev_with_a_leading_space_and_keeps_its_last_223_tokens():
    runtime = post(language="en", prompt="  Glossary: Kubernetes ")
    prompt = runtime.generates[0].prompt_token_ids
    assert prompt == (
        START_OF_PREV_ID,
        *text_ids(" Glossary: Kubernetes"),
        START_OF_TRANSCRIPT_ID,
        LANGUAGE_IDS["en"],
        TRANSCRIBE_ID,
        NO_TIMESTAMPS_ID,
    )
    assert runtime.generates[0].params.max_tokens == 448 - len(prompt)
    long = "abcdefghij" * 50
    prompt = post(language="en", prompt=long).generates[0].prompt_token_ids
    assert prompt[0] == START_OF_PREV_ID and bytes(prompt[1:224]) == long.encode()[-223:]
    assert prompt[224] == START_OF_TRANSCRIPT_ID and len(prompt) == 228
    assert post(language="en", prompt="x", max_completion_tokens="5").generates[0].params.max_tokens == 5
    error = post(language="en", prompt="<|endoftext|> hi").error()
    assert error["param"] == "prompt" and "special tokens" in error["message"]


def test_sampling_fields_reach_the_engine():
    params = post(
        language="en", temperature="0.4", top_p="0.9", top_k="5", min_p="0.1", seed="7",
        frequency_penalty="0.5", presence_penalty="-0.5", repetition_penalty="1.2",
    ).generates[0].params  # fmt: skip
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (
        0.4,
        0.9,
        5,
        0.1,
        7,
    )
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)


def test_a_70_second_upload_is_three_windows_joined_in_order_whatever_order_they_finish():
    noise = numpy.random.default_rng(0).uniform(-0.3, 0.3, 70 * RATE).astype(numpy.float32)
    runtime = post(audio_bytes(noise[None, :], RATE, "flac"), language="en")
    first, second, third = runtime.generates
    assert [g.media[0].shape for g in (first, second, third)] == [(WINDOW,), (WINDOW,), (10 * RATE,)]
    assert len({g.request_id for g in (first, second, third)}) == 3
    assert len({g.media[0].hash for g in (first, second, third)}) == 3
    assert first.prompt_token_ids == second.prompt_token_ids == third.prompt_token_ids
    runtime.feed(tokens(third, text_ids(" three.") + [END_OF_TEXT_ID]))
    runtime.feed(tokens(first, text_ids(" One,") + [END_OF_TEXT_ID]))
    assert not runtime.ended
    runtime.feed(tokens(second, text_ids(" two,") + [END_OF_TEXT_ID]))
    assert runtime.json() == {"text": "One, two, three.", "usage": {"type": "duration", "seconds": 70}}


def test_equal_windows_hash_equal():
    silence = io.BytesIO()
    with wave.open(silence, "wb") as sink:
        sink.setnchannels(1)
        sink.setsampwidth(2)
        sink.setframerate(RATE)
        sink.writeframes(b"\x00\x00" * (60 * RATE))
    first, second = post(silence.getvalue(), language="en").generates
    assert first.media[0].hash == second.media[0].hash and first.request_id != second.request_id


def test_stereo_at_another_rate_is_mixed_and_resampled_and_usage_rounds_up():
    runtime = post(wav(2.5, rate=44100, channels=2), language="en")
    (generate,) = runtime.generates
    assert generate.media[0].shape == (40000,)
    runtime.feed(tokens(generate, text_ids(" hi") + [END_OF_TEXT_ID]))
    assert runtime.json()["usage"] == {"type": "duration", "seconds": 3}


# ---- language detection ----


def test_without_a_language_a_multilingual_model_detects_it_on_the_first_window():
    runtime = post(wav(40.0), response_format="verbose_json")
    (detect,) = runtime.generates
    assert detect.prompt_token_ids == (START_OF_TRANSCRIPT_ID,)
    assert detect.params.max_tokens == 1 and detect.params.temperature == 0.0
    assert detect.params.allowed_token_ids == tuple(sorted(LANGUAGE_IDS.values()))
    assert detect.media[0].shape == (WINDOW,)
    runtime.feed(tokens(detect, [LANGUAGE_IDS["de"]], finish="length"))
    first, second = runtime.generates[1:]
    assert first.prompt_token_ids == (START_OF_TRANSCRIPT_ID, LANGUAGE_IDS["de"], TRANSCRIBE_ID)
    assert first.media[0].hash == detect.media[0].hash and second.media[0].shape == (10 * RATE,)
    runtime.feed(tokens(first, timed(0.0, " Hallo", 1.0)), tokens(second, timed(0.0, " Welt", 2.0)))
    answer = runtime.json()
    assert answer["language"] == "german" and answer["text"] == "Hallo Welt"


def test_a_detection_answer_that_is_no_language_falls_back_to_english():
    runtime = post()
    runtime.feed(tokens(runtime.generates[0], [ord("x")], finish="length"))
    assert runtime.generates[1].prompt_token_ids[1] == LANGUAGE_IDS["en"]


def test_disconnecting_during_detection_aborts_it():
    runtime = post()
    assert runtime.call.disconnected() == [Abort(runtime.generates[0].request_id)]


# ---- response formats ----


def run_verbose(**fields) -> Runtime:
    runtime = post(wav(70.0), language="en", response_format="verbose_json", **fields)
    first, second, third = runtime.generates
    assert first.prompt_token_ids == (
        START_OF_TRANSCRIPT_ID,
        LANGUAGE_IDS["en"],
        TRANSCRIBE_ID,
    )  # timestamps on
    assert first.params.logprobs == 0
    runtime.feed(
        tokens(third, timed(0.0, " Three.", 4.0, 4.0, " Four", 9.5, 9.6, " and more"), logprob=-0.5),
        tokens(first, timed(0.0, " One.", 12.0, 12.5, " Still one.", 29.0), logprob=-1.0),
        tokens(second, timed(1.0, " Two.", 3.5), logprob=-0.2),
    )
    return runtime


def test_verbose_json_segments_are_timed_from_the_timestamps_and_offset_by_the_window():
    answer = run_verbose().json()
    assert answer["task"] == "transcribe" and answer["language"] == "english" and answer["duration"] == 70.0
    assert answer["text"] == "One. Still one. Two. Three. Four and more"
    assert answer["usage"] == {"type": "duration", "seconds": 70}
    spans = [(s["start"], s["end"], s["text"]) for s in answer["segments"]]
    assert spans == [
        (0.0, 12.0, " One."),
        (12.5, 29.0, " Still one."),
        (31.0, 33.5, " Two."),
        (60.0, 64.0, " Three."),
        (64.0, 69.5, " Four"),
        (69.6, 70.0, " and more"),  # the window ended inside it: closed at the audio's end
    ]
    segments = answer["segments"]
    assert [s["id"] for s in segments] == list(range(6))
    assert [s["seek"] for s in segments] == [0, 0, 3000, 6000, 6000, 6000]
    assert segments[0]["tokens"] == [timestamp_id(0.0), *text_ids(" One."), timestamp_id(12.0)]
    assert segments[0]["avg_logprob"] == -1.0 and segments[2]["avg_logprob"] == -0.2
    assert all(s["temperature"] == 0.0 and s["no_speech_prob"] == 0.0 for s in segments)
    assert all(s["compression_ratio"] > 0 for s in segments)


def test_verbose_json_with_segment_granularity_is_the_same():
    assert run_verbose(**{"timestamp_granularities[]": "segment"}).json()["segments"][0]["end"] == 12.0


SRT_CUE = re.compile(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)\n(.+(?:\n.+)*)")
VTT_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)\n(.+(?:\n.+)*)")


def seconds(h, m, s, ms) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def check_cues(cues: list[tuple[float, float, str]]) -> None:
    assert [text for _, _, text in cues] == ["One.", "Still one.", "Two.", "Three.", "Four", "and more"]
    ends = [0.0]
    for start, end, _ in cues:
        assert ends[-1] <= start <= end <= 70.0
        ends.append(end)
    assert cues[0][0] == 0.0 and cues[-1][1] == 70.0  # covering the audio


def test_srt_parses_back_numbered_with_monotonic_times():
    runtime = post(wav(70.0), language="en", response_format="srt")
    assert (
        runtime.generates[0].params.logprobs is None
        and NO_TIMESTAMPS_ID not in runtime.generates[0].prompt_token_ids
    )
    first, second, third = runtime.generates
    runtime.feed(
        tokens(first, timed(0.0, " One.", 12.0, 12.5, " Still one.", 29.0)),
        tokens(second, timed(1.0, " Two.", 3.5)),
        tokens(third, timed(0.0, " Three.", 4.0, 4.0, " Four", 9.5, 9.6, " and more")),
    )
    assert runtime.headers[b"content-type"] == b"text/plain; charset=utf-8"
    blocks = runtime.body.decode().split("\n\n")
    assert blocks[-1] == "" and all(blocks[:-1])
    cues = []
    for number, block in enumerate(blocks[:-1], 1):
        match = SRT_CUE.fullmatch(block)
        assert match and int(match[1]) == number, block
        cues.append((seconds(*match.groups()[1:5]), seconds(*match.groups()[5:9]), match[10]))
    check_cues(cues)
    assert runtime.body.decode().startswith("1\n00:00:00,000 --> 00:00:12,000\nOne.\n\n2\n00:00:12,500")


def test_vtt_parses_back_with_its_header_and_monotonic_times():
    runtime = post(wav(70.0), language="en", response_format="vtt")
    first, second, third = runtime.generates
    runtime.feed(
        tokens(third, timed(0.0, " Three.", 4.0, 4.0, " Four", 9.5, 9.6, " and more")),
        tokens(second, timed(1.0, " Two.", 3.5)),
        tokens(first, timed(0.0, " One.", 12.0, 12.5, " Still one.", 29.0)),
    )
    assert runtime.headers[b"content-type"] == b"text/vtt; charset=utf-8"
    header, *blocks = runtime.body.decode().split("\n\n")
    assert header == "WEBVTT" and blocks[-1] == ""
    cues = []
    for block in blocks[:-1]:
        match = VTT_CUE.fullmatch(block)
        assert match, block
        cues.append((seconds(*match.groups()[0:4]), seconds(*match.groups()[4:8]), match[9]))
    check_cues(cues)


def test_subtitles_stay_well_formed_whatever_timestamps_a_model_emits():
    runtime = post(wav(20.0), language="en", response_format="srt")
    (generate,) = runtime.generates
    runtime.feed(
        tokens(
            generate,
            [*text_ids(" no start"), timestamp_id(5.0), timestamp_id(29.0), *text_ids(" past the end"),
             timestamp_id(30.0), timestamp_id(2.0), *text_ids(" backwards\n\n--> x"), timestamp_id(1.0),
             timestamp_id(3.0), timestamp_id(4.0), END_OF_TEXT_ID],
        )
    )  # fmt: skip
    blocks = runtime.body.decode().split("\n\n")[:-1]
    cues = [SRT_CUE.fullmatch(block) for block in blocks]
    assert all(cues), blocks
    times = [(seconds(*m.groups()[1:5]), seconds(*m.groups()[5:9])) for m in cues]
    assert times == [
        (0.0, 5.0),
        (20.0, 20.0),
        (20.0, 20.0),
    ]  # clamped into the 20 s of audio, never backwards
    assert [m[10] for m in cues] == ["no start", "past the end", "backwards\n-> x"]


def test_text_format_is_plain_text():
    runtime = post(language="en", response_format="text")
    runtime.feed(tokens(runtime.generates[0], text_ids(" Hello there. ") + [END_OF_TEXT_ID]))
    assert runtime.headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert runtime.body == b"Hello there."


def test_a_window_cut_by_length_still_answers_its_text():
    runtime = post(language="en")
    runtime.feed(tokens(runtime.generates[0], text_ids(" la la la"), finish="length"))
    assert runtime.json()["text"] == "la la la"


# ---- streaming ----


def test_stream_deltas_go_out_in_window_order_with_usage():
    runtime = post(wav(70.0), language="en", stream="true", stream_include_usage="true")
    first, second, third = runtime.generates
    runtime.feed(tokens(third, text_ids(" three"), finish=None))
    assert runtime.status == 200 and runtime.body == b""  # committed; window 3 waits for 1 and 2
    runtime.feed(tokens(first, text_ids(" one"), finish=None))
    runtime.feed(tokens(first, [END_OF_TEXT_ID]))
    runtime.feed(tokens(third, text_ids(" 3") + [END_OF_TEXT_ID]))
    runtime.feed(tokens(second, text_ids(" two") + [END_OF_TEXT_ID]))
    chunks = runtime.events()
    *deltas, usage = chunks
    assert "".join(c["choices"][0]["delta"]["content"] for c in deltas) == "one two three 3"
    assert [c["choices"][0]["delta"]["content"] for c in deltas] == ["one", " two three 3"]
    for chunk in deltas:
        assert chunk["object"] == "transcription.chunk" and chunk["id"] == "trsc-r1"
        assert chunk["model"] == "tiny-speech-model" and chunk["created"] == 1_700_000_000
    assert [c["choices"][0]["finish_reason"] for c in deltas] == [None, "stop"]
    assert "usage" not in deltas[0]
    prompt = 3 * 4
    completion = 4 + 1 + 6 + 3 + 5
    assert usage == {
        "id": "trsc-r1", "object": "transcription.chunk", "created": 1_700_000_000, "model": "tiny-speech-model",
        "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }  # fmt: skip


def test_stream_continuous_usage_and_translation_chunks():
    runtime = post(
        path=TRANSLATIONS, language="fr", stream="true",
        stream_include_usage="true", stream_continuous_usage_stats="true",
    )  # fmt: skip
    (generate,) = runtime.generates
    runtime.feed(tokens(generate, text_ids(" Hi"), finish=None), tokens(generate, [END_OF_TEXT_ID]))
    first, last, usage = runtime.events()
    assert first["object"] == "translation.chunk" and first["id"].startswith("trsl-")
    assert first["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert last["usage"]["completion_tokens"] == 4 and usage["choices"] == []


def test_force_include_usage_adds_the_usage_chunk():
    runtime = post(app=make_app(enable_force_include_usage=True), language="en", stream="true")
    runtime.feed(tokens(runtime.generates[0], text_ids(" a") + [END_OF_TEXT_ID]))
    assert runtime.events()[-1]["choices"] == []


def test_a_failure_before_any_output_keeps_its_status_and_aborts_the_other_windows():
    runtime = post(wav(70.0), language="en", stream="true")
    first, second, third = runtime.generates
    runtime.feed(Failed(second.request_id, 503, "over capacity"))
    assert runtime.error(503)["message"] == "over capacity"
    assert runtime.headers[b"retry-after"] == b"1"
    assert sorted(a.request_id for a in runtime.aborts) == sorted([first.request_id, third.request_id])
    assert runtime.call.disconnected() == []


def test_a_failure_mid_stream_is_an_sse_error_frame():
    runtime = post(wav(40.0), language="en", stream="true")
    first, second = runtime.generates
    runtime.feed(tokens(first, text_ids(" one"), finish=None))
    runtime.feed(Failed(second.request_id, 500, "engine error"))
    *_, error = runtime.events()
    assert error["error"]["message"] == "engine error" and runtime.status == 200
    assert [a.request_id for a in runtime.aborts] == [first.request_id]


def test_disconnect_aborts_every_running_window():
    runtime = post(wav(70.0), language="en")
    first, second, third = runtime.generates
    runtime.feed(tokens(second, text_ids(" two") + [END_OF_TEXT_ID]))
    assert runtime.call.disconnected() == [Abort(first.request_id), Abort(third.request_id)]
    assert runtime.call.finished and runtime.call.disconnected() == []


def test_events_of_other_requests_and_samples_are_ignored():
    runtime = post(language="en")
    (generate,) = runtime.generates
    runtime.feed(
        Tokens(request_id="other", index=0, token_ids=(1,), num_prompt_tokens=1, finish_reason="stop"),
        Tokens(
            request_id=generate.request_id, index=1, token_ids=(1,), num_prompt_tokens=1, finish_reason="stop"
        ),
        Failed("other", 500, "not ours"),
    )
    assert runtime.status is None
    runtime.feed(tokens(generate, text_ids(" ok") + [END_OF_TEXT_ID]))
    assert runtime.json()["text"] == "ok"


# ---- models ----


def test_without_model_the_first_speech_model_serves_and_a_chat_model_is_refused():
    app = make_app([tiny_served_model(), tiny_speech_model()])
    assert post(app=app, language="en").call.model == "tiny-speech-model"
    error = post(app=app, model="tiny-byte-model").error()
    assert error["message"] == "The model does not support Transcriptions API" and error["param"] == "model"
    error = post(app=app, model="tiny-byte-model", path=TRANSLATIONS).error()
    assert error["message"] == "The model does not support Translations API"
    assert post(app=make_app([tiny_served_model()])).error()["param"] == "model"
    assert post(app=app, model="nope").error(404)["param"] == "model"


def test_request_ids_from_the_client_get_a_fresh_engine_tag():
    app = make_app()
    headers, body = form({"file": ("a.wav", WAV_5S)}, {"language": "en"})
    headers.append((b"x-request-id", b"mine"))
    one = Runtime(app.handle("POST", TRANSCRIPTIONS, headers, body)).generates[0].request_id
    two = Runtime(app.handle("POST", TRANSCRIPTIONS, headers, body)).generates[0].request_id
    assert one != two and one.startswith("trsc-mine-")


# ---- refusals: 4xx, never 5xx ----


def truncated_wav() -> bytes:
    return WAV_5S[:60]


@pytest.mark.parametrize(
    ("audio", "words"),
    [
        (b"this is not audio", "not audio in a supported format"),
        (b"", "the data is empty"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "not audio"),
        (truncated_wav(), None),
        (audio_bytes(numpy.stack([sine(RATE, 1.0)]), RATE, "mp3")[:200], None),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "not audio"),
    ],
    ids=["text", "empty", "wav-header-only", "truncated-wav", "truncated-mp3", "png"],
)
def test_bad_audio_is_a_400_naming_the_file(audio, words):
    runtime = post(audio=audio, language="en")
    if runtime.status is None:  # a truncation that still holds some samples decodes
        assert runtime.generates
        return
    error = runtime.error()
    assert error["param"] == "file" and error["message"].startswith("Invalid audio in file")
    assert words is None or words in error["message"]


def test_upload_and_duration_limits():
    error = post(app=make_app(max_audio_upload_bytes=1000), language="en").error(413)
    assert error["param"] == "file" and "over the limit of 1000 bytes" in error["message"]
    error = post(app=make_app(max_audio_upload_seconds=4.0), language="en").error()
    assert error["param"] == "file" and "longer than the limit of 4 s" in error["message"]
    headers, body = form({"file": ("a.wav", WAV_5S)})
    runtime = Runtime(make_app(max_request_body_bytes=1000).handle("POST", TRANSCRIPTIONS, headers, body))
    assert "Request body too large" in runtime.error(413)["message"]


def test_wrong_field_names_say_what_is_expected():
    headers, body = form({"audio": ("a.wav", WAV_5S)}, {"language": "en"})
    error = Runtime(make_app().handle("POST", TRANSCRIPTIONS, headers, body)).error()
    assert error["param"] == "file" and "named 'file'" in error["message"] and "'audio'" in error["message"]
    headers, body = form({"language": (None, "en")})  # multipart, but no file part
    error = Runtime(make_app().handle("POST", TRANSCRIPTIONS, headers, body)).error()
    assert "named 'file'" in error["message"] and "has none" in error["message"]
    headers, body = form({"file": (None, "not a file")}, {"language": "en"})
    error = Runtime(make_app().handle("POST", TRANSCRIPTIONS, headers, body)).error()
    assert "must be a file part" in error["message"]
    headers, body = form([("file", ("a.wav", WAV_5S)), ("file", ("b.wav", WAV_5S))])
    assert (
        "more than one 'file'"
        in Runtime(make_app().handle("POST", TRANSCRIPTIONS, headers, body)).error()["message"]
    )


def test_a_json_body_is_told_to_send_multipart():
    for headers in ([(b"content-type", b"application/json")], []):
        call = make_app().handle("POST", TRANSCRIPTIONS, headers, b'{"file": "x"}')
        error = Runtime(call).error()
        assert "multipart/form-data" in error["message"]
    error = Runtime(
        make_app().handle("POST", TRANSLATIONS, [(b"content-type", b"multipart/form-data")], b"")
    ).error()
    assert "no boundary" in error["message"]


def test_unknown_fields_are_ignored_and_empty_fields_are_unset():
    runtime = post(language="en", include="logprobs", chunking_strategy="auto", response_format="", model="")
    assert runtime.generates


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"temperature": "1.5"}, "temperature", "between 0 and 1"),
        ({"temperature": "-0.1"}, "temperature", "between 0 and 1"),
        ({"temperature": "hot"}, "temperature", "Expected `float`"),
        ({"temperature": "nan"}, "temperature", "finite"),
        ({"response_format": "diarized_json"}, "response_format", "Invalid enum value"),
        ({"stream": "maybe"}, "stream", "Expected `bool`"),
        ({"stream": "true", "response_format": "srt"}, "response_format", "Streaming answers only"),
        ({"stream": "true", "response_format": "verbose_json"}, "response_format", "Streaming answers only"),
        ({"stream_include_usage": "true"}, "stream_include_usage", "only be defined when `stream=True`"),
        ({"timestamp_granularities[]": "word", "response_format": "verbose_json"}, "timestamp_granularities[]", "Word timestamps"),
        ({"timestamp_granularities[]": "segment"}, "timestamp_granularities[]", "needs response_format 'verbose_json'"),
        ({"timestamp_granularities[]": "sentence"}, "timestamp_granularities[]", "Invalid enum value"),
        ({"language": "xx"}, "language", "Unsupported language: 'xx'"),
        ({"language": "english"}, "language", "ISO-639-1"),
        ({"top_p": "0"}, "top_p", "(0, 1]"),
        ({"top_k": "-2"}, "top_k", "top_k"),
        ({"min_p": "2"}, "min_p", "[0, 1]"),
        ({"frequency_penalty": "3"}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": "0"}, "repetition_penalty", "greater than zero"),
        ({"seed": str(2**64)}, "seed", "seed must be between"),
        ({"seed": "1.5"}, "seed", "Expected `int | null`"),
        ({"max_completion_tokens": "0"}, "max_completion_tokens", "at least 1"),
    ],
)  # fmt: skip
def test_bad_fields_are_400s_naming_the_field(fields, param, words):
    error = post(**fields).error()
    assert error["param"] == param and words in error["message"], error


def test_a_field_given_twice_is_a_400():
    headers, body = form({"file": ("a.wav", WAV_5S)}, {"language": ["en", "fr"]})
    error = Runtime(make_app().handle("POST", TRANSCRIPTIONS, headers, body)).error()
    assert error["param"] == "language" and "more than once" in error["message"]


def test_translations_refuse_timestamp_granularities():
    error = post(
        path=TRANSLATIONS, response_format="verbose_json", **{"timestamp_granularities[]": "segment"}
    ).error()
    assert error["param"] == "timestamp_granularities[]"


# ---- the official openai client, against the core ----


class ScriptedServer:
    """An httpx transport that answers with the core: each window gets `script(index, generate)`'s ids."""

    def __init__(self, app: App, script):
        self.app = app
        self.script = script
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        headers = [(name.encode(), value.encode()) for name, value in request.headers.items()]
        runtime = Runtime(self.app.handle(request.method, request.url.path, headers, request.read()))
        seen = 0
        while not runtime.ended:
            new = runtime.generates[seen:]
            assert new, "the call waits for nothing"
            seen += len(new)
            for generate in new:
                ids = self.script(generate)
                runtime.feed(tokens(generate, ids[:2], finish=None), tokens(generate, ids[2:]))
        return httpx.Response(runtime.status, headers=list(runtime.headers.items()), content=runtime.body)


def whisper_script(generate: Generate) -> list[int]:
    if generate.request_id.endswith("-lang"):
        return [LANGUAGE_IDS["fr"]]
    window = int(generate.request_id.rsplit("-", 1)[1])
    if NO_TIMESTAMPS_ID in generate.prompt_token_ids:
        return text_ids(f" Window {window}.") + [END_OF_TEXT_ID]
    return timed(0.0, f" Window {window}.", 2.0)


@pytest.fixture
def client():
    server = ScriptedServer(make_app(), whisper_script)
    http = httpx.Client(transport=httpx.MockTransport(server))
    with openai.OpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0) as client:
        client.server = server  # type: ignore[attr-defined]
        yield client


AUDIO_40S = wav(40.0)


def test_openai_client_json_and_text(client):
    result = client.audio.transcriptions.create(
        model="tiny-speech-model", file=("a.wav", AUDIO_40S), language="en"
    )
    assert (
        result.text == "Window 0. Window 1."
        and result.usage.seconds == 40
        and result.usage.type == "duration"
    )
    text = client.audio.transcriptions.create(
        model="tiny-speech-model", file=("a.wav", AUDIO_40S), language="en", response_format="text"
    )
    assert text == "Window 0. Window 1."


def test_openai_client_verbose_json_with_granularities(client):
    result = client.audio.transcriptions.create(
        model="tiny-speech-model", file=("a.wav", AUDIO_40S), response_format="verbose_json",
        timestamp_granularities=["segment"], prompt="names: Anna",
    )  # fmt: skip
    assert result.language == "french" and result.duration == 40.0
    assert [(s.start, s.end, s.text) for s in result.segments] == [
        (0.0, 2.0, " Window 0."),
        (30.0, 32.0, " Window 1."),
    ]
    body = client.server.requests[-1].read()  # type: ignore[attr-defined]
    assert b'name="timestamp_granularities[]"' in body


def test_openai_client_srt_vtt_and_translation(client):
    srt = client.audio.transcriptions.create(
        model="tiny-speech-model", file=("a.wav", AUDIO_40S), response_format="srt", language="de"
    )
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,000\nWindow 0.\n\n2\n00:00:30,000 --> 00:00:32,000")
    vtt = client.audio.transcriptions.create(
        model="tiny-speech-model", file=("a.wav", AUDIO_40S), response_format="vtt", language="de"
    )
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.000\nWindow 0.")
    with warnings.catch_warnings():  # openai marks whisper translations deprecated; the API stays
        warnings.simplefilter("ignore", DeprecationWarning)
        translation = client.audio.translations.create(model="tiny-speech-model", file=("a.wav", AUDIO_40S))
    assert translation.text == "Window 0. Window 1."


def test_openai_client_iterates_a_stream(client):
    stream = client.audio.transcriptions.create(
        model="tiny-speech-model", file=("a.wav", AUDIO_40S), language="en", stream=True,
        extra_body={"stream_include_usage": True},
    )  # fmt: skip
    events = list(stream)
    deltas = [event.choices[0]["delta"]["content"] for event in events if event.choices]  # type: ignore[attr-defined]
    assert "".join(deltas) == "Window 0. Window 1."
    assert events[-1].usage["completion_tokens"] == 2 * len(text_ids(" Window 0.") + [END_OF_TEXT_ID])  # type: ignore[attr-defined]


def test_openai_client_gets_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="tiny-speech-model", file=("a.wav", b"not audio"))
    assert "Invalid audio in file" in str(caught.value)


def test_duration_rounding_is_ceil():
    from protocol.transcription_output import duration_seconds

    assert [duration_seconds(x) for x in (0.0, 0.001, 1.0, 1.5, 69.99)] == [0, 1, 1, 2, 70]
    assert duration_seconds(2.0) == math.ceil(2.0)


def test_openapi_documents_the_forms():
    document = json.loads(make_app().handle("GET", "/openapi.json", [], b"").body)
    for path in (TRANSCRIPTIONS, TRANSLATIONS):
        operation = document["paths"][path]["post"]
        schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert schema["required"] == ["file"] and schema["properties"]["file"]["format"] == "binary"
        assert {"model", "language", "prompt", "response_format", "temperature", "stream"} <= set(
            schema["properties"]
        )
        assert {"200", "400", "404", "413"} <= set(operation["responses"])
    transcription = document["paths"][TRANSCRIPTIONS]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "timestamp_granularities[]" in transcription["schema"]["properties"]
