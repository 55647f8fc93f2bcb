"""POST /v1/audio/transcriptions and /v1/audio/translations: an upload in, text (or subtitles) out.

`build_transcription_call` checks the request (413 past the upload limit), has the upload decoded
off the event loop (400 for anything not audio or longer than the duration limit), cuts it into the
model's 30 s windows and prepares one `Generate` per window (engine ids `f"{response_id}{engine_tag}-{index}"`), all
submitted at once so the engine batches them with its other work. A multilingual model asked for
no `language` first runs one detection step on the first window (`-lang`), then submits the
windows with the language it found.

Answers are built when every window has finished, texts joined in window order whatever order the
events arrive in. A stream (json/text only) sends each window's text deltas as soon as the windows
before it have finished (later windows' text waits, in order), with vLLM's chunk shape; the status
is committed at the first window output, so an engine failure before it keeps its real status.
A disconnect aborts every window still running.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from protocol.calls.base import JSON_CONTENT_TYPE, CallIdentity, EngineCall, Headers, retry_after
from protocol.calls.deferred import DeferredCall
from protocol.detokenizer import IncrementalDetokenizer
from protocol.engine_api import Abort, Event, Failed, Generate, SamplingParams, Tokens
from protocol.errors import ProtocolError
from protocol.media.audio import decode_audio
from protocol.media.spec import SpeechSpec
from protocol.model import ServedModel
from protocol.outputs import Body, EndResponse, Output, StartResponse, Submit, whole_response
from protocol.responses import UsageInfo, encode
from protocol.sse import DONE_FRAME, SSE_HEADERS, data_frame, error_frame
from protocol.transcription import (
    AudioWindow,
    SpeechOptions,
    TranscriptionRequest,
    audio_windows,
    decoder_prompt,
    detection_params,
    detection_prompt,
    sampling_params,
    speech_options,
)
from protocol.transcription_output import (
    DeltaContent,
    SpeechResult,
    TranscriptionStreamChoice,
    TranscriptionStreamResponse,
    WindowOutput,
    response_body,
    text_ids,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_AUDIO_UPLOAD_BYTES = (
    25 * 1024 * 1024
)  # OpenAI's and vLLM's (VLLM_MAX_AUDIO_CLIP_FILESIZE_MB) 25 MB
DEFAULT_MAX_AUDIO_SECONDS = 3600.0  # one hour: 230 MB of float32 samples at 16 kHz, 120 windows


@dataclass(frozen=True, slots=True)
class SpeechSettings:
    """The server options that shape speech calls (from `AppConfig`)."""

    max_upload_bytes: int = DEFAULT_MAX_AUDIO_UPLOAD_BYTES
    max_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    enable_force_include_usage: bool = False


def speech_spec(model: ServedModel, api: str) -> SpeechSpec:
    """The model's speech spec, or vLLM's 400 for a model that does not transcribe."""
    if not model.supports("transcription") or model.speech is None:
        raise ProtocolError(f"The model does not support {api} API", status=400, param="model")
    return model.speech


def build_transcription_call(
    request: TranscriptionRequest,
    model: ServedModel,
    settings: SpeechSettings,
    identity: CallIdentity,
) -> DeferredCall:
    """Check a speech request, then have its upload decoded and windowed off the event loop (an
    hour of audio takes seconds) before the call that submits the windows exists; raises
    `ProtocolError` for a bad request, and a bad upload is a 4xx once decoded."""
    api = "Transcriptions" if request.task == "transcribe" else "Translations"
    spec = speech_spec(model, api)
    options = speech_options(request, model, spec)
    if len(request.file) > settings.max_upload_bytes:
        raise ProtocolError(
            f"The audio file is {len(request.file)} bytes, over the limit of {settings.max_upload_bytes} bytes.",
            status=413,
            param="file",
        )
    # the sampling checks need the prompt's length, which the language does not change
    params = sampling_params(request, model, spec, len(decoder_prompt(spec, request.task, "en", options)))
    prefix = "trsc" if request.task == "transcribe" else "trsl"
    response_id = identity.response_id(prefix)

    def decode() -> tuple[list[AudioWindow], float]:
        audio = decode_audio(
            request.file, spec.sample_rate, where="file", param="file", max_seconds=settings.max_seconds
        )
        return audio_windows(audio, spec), audio.shape[0] / spec.sample_rate

    def build(decoded: tuple[list[AudioWindow], float]) -> TranscriptionCall:
        windows, duration = decoded
        return TranscriptionCall(
            request,
            model,
            spec,
            options,
            windows,
            params,
            settings,
            response_id=response_id,
            engine_id=identity.engine_request_id(response_id),
            created=identity.created,
            headers=identity.headers,
            duration=duration,
        )

    return DeferredCall(decode, build, model.engine_name, identity.headers)


class _Window:
    """One window's engine request and what it produced."""

    def __init__(self, audio: AudioWindow, request_id: str) -> None:
        self.audio = audio
        self.request_id = request_id
        self.generate: Generate | None = None  # set once the language is known
        self.output = WindowOutput(index=audio.index, start=audio.start, duration=audio.duration)
        self.detokenizer: IncrementalDetokenizer | None = None
        self.pending = ""  # streamed text waiting for the windows before it

    @property
    def prompt_len(self) -> int:
        return len(self.generate.prompt_token_ids) if self.generate is not None else 0


class TranscriptionCall(EngineCall):
    """Runs a speech request's windows (after language detection, when needed) and answers them."""

    def __init__(
        self,
        request: TranscriptionRequest,
        model: ServedModel,
        spec: SpeechSpec,
        options: SpeechOptions,
        windows: Sequence[AudioWindow],
        params: SamplingParams,
        settings: SpeechSettings,
        *,
        response_id: str,
        engine_id: str,
        created: int,
        headers: Headers = (),
        duration: float,
    ) -> None:
        self.model = model.engine_name
        self.served_name = model.name
        self.response_id = response_id
        self.created = created
        self.extra_headers = headers
        self.request = request
        self.spec = spec
        self.options = options
        self.params = params
        self.lora_name = model.lora_name
        self.tokenizer = model.tokenizer
        self.duration = duration
        self.stream = request.stream
        self.include_usage = request.stream and (
            request.stream_include_usage or settings.enable_force_include_usage
        )
        self.continuous_usage = self.include_usage and request.stream_continuous_usage_stats
        self.chunk_object = "transcription.chunk" if request.task == "transcribe" else "translation.chunk"
        self.windows = [_Window(window, f"{engine_id}-{window.index}") for window in windows]
        self._by_id = {window.request_id: window for window in self.windows}
        self.language = options.language
        self._detect_id = f"{engine_id}-lang"
        self._detecting = False
        self._next = 0  # the first window whose streamed text is not all sent
        self._streamed_any = False
        self._committed = False
        self._done = False

    # ---- the Call interface ----

    def start(self) -> list[Output]:
        if self.language is None:
            self._detecting = True
            detect = Generate(
                request_id=self._detect_id,
                prompt_token_ids=detection_prompt(self.spec),
                params=detection_params(self.spec),
                lora_name=self.lora_name,
                media=(self.windows[0].audio.media,),
            )
            return [Submit((detect,))]
        return [self._submit_windows(self.language)]

    def _submit_windows(self, language: str) -> Submit:
        self.language = language
        prompt = decoder_prompt(self.spec, self.request.task, language, self.options)
        for window in self.windows:
            window.generate = Generate(
                request_id=window.request_id,
                prompt_token_ids=prompt,
                params=self.params,
                lora_name=self.lora_name,
                media=(window.audio.media,),
            )
            if self.stream:
                window.detokenizer = IncrementalDetokenizer(self.tokenizer)
        return Submit(tuple(window.generate for window in self.windows if window.generate is not None))

    # ---- events ----

    def _on_event(self, event: Event) -> list[Output]:
        if isinstance(event, Failed):
            if event.request_id == self._detect_id or event.request_id in self._by_id:
                return self._fail(ProtocolError(event.message, status=event.status), event.request_id)
            return []
        if not isinstance(event, Tokens) or event.index != 0:
            return []
        if event.request_id == self._detect_id:
            return self._detected(event) if self._detecting else []
        window = self._by_id.get(event.request_id)
        if window is None or window.generate is None or window.output.finished:
            return []
        output = window.output
        output.token_ids.extend(event.token_ids)
        if event.logprobs:
            output.logprobs.extend(entry.logprob for entry in event.logprobs)
        if event.finish_reason is not None:
            output.finish_reason = event.finish_reason
            output.stop_reason = event.stop_reason
        outputs: list[Output] = []
        if self.stream:
            if not self._committed:
                outputs += self._commit()
            outputs += [Body(frame) for frame in self._stream_frames(window, event)]
        if all(window.output.finished for window in self.windows):
            outputs += self._complete()
        return outputs

    def _detected(self, event: Tokens) -> list[Output]:
        """The detection step's token is the language; then the windows run."""
        if event.finish_reason is None and not event.token_ids:
            return []
        self._detecting = False
        codes = {token: code for code, token in self.spec.languages.items()}
        found = next((codes[token] for token in event.token_ids if token in codes), None)
        if found is None:
            logger.warning(
                "language detection of %s answered %s, not a language token",
                self.response_id,
                event.token_ids,
            )
            found = "en"
        outputs: list[Output] = []
        if event.finish_reason is None:
            outputs.append(Submit((Abort(self._detect_id),)))
        outputs.append(self._submit_windows(found))
        return outputs

    # ---- streams ----

    def _commit(self) -> list[Output]:
        self._committed = True
        return [StartResponse(200, SSE_HEADERS + self.extra_headers)]

    def _stream_frames(self, window: _Window, event: Tokens) -> list[bytes]:
        assert window.detokenizer is not None
        window.pending += window.detokenizer.push(text_ids(event.token_ids, self.spec, self.tokenizer))
        if window.output.finished:
            window.pending += window.detokenizer.flush()
        text = self._release()
        finished = all(w.output.finished for w in self.windows)
        if not text and not finished:
            return []
        reasons = [w.output.finish_reason for w in self.windows]
        last = self.windows[-1].output
        choice = TranscriptionStreamChoice(
            delta=DeltaContent(content=text),
            finish_reason=("length" if "length" in reasons else last.finish_reason) if finished else None,
            stop_reason=last.stop_reason if finished else None,
        )
        chunk = TranscriptionStreamResponse(
            id=self.response_id,
            object=self.chunk_object,
            created=self.created,
            model=self.served_name,
            choices=[choice],
            usage=self._usage() if self.continuous_usage else msgspec.UNSET,
        )
        return [data_frame(encode(chunk))]

    def _release(self) -> str:
        """The text that may go out now: pending text of windows in order, up to the first unfinished."""
        pieces = []
        while self._next < len(self.windows):
            window = self.windows[self._next]
            pieces.append(window.pending)
            window.pending = ""
            if not window.output.finished:
                break
            self._next += 1
        text = "".join(pieces)
        if not self._streamed_any:  # the answer's leading space, stripped as the whole text is
            text = text.lstrip()
            self._streamed_any = bool(text)
        return text

    def _usage(self) -> UsageInfo:
        prompt = sum(window.prompt_len for window in self.windows)
        completion = sum(len(window.output.token_ids) for window in self.windows)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=msgspec.UNSET,
        )

    # ---- the end ----

    def _complete(self) -> list[Output]:
        self._done = True
        if self.stream:
            outputs: list[Output] = []
            if self.include_usage:
                chunk = TranscriptionStreamResponse(
                    id=self.response_id,
                    object=self.chunk_object,
                    created=self.created,
                    model=self.served_name,
                    choices=[],
                    usage=self._usage(),
                )
                outputs.append(Body(data_frame(encode(chunk))))
            return [*outputs, Body(DONE_FRAME), EndResponse()]
        result = SpeechResult(
            task=self.request.task,
            language=self.language or "en",
            duration=self.duration,
            temperature=self.request.temperature,
            outputs=[window.output for window in self.windows],
            spec=self.spec,
            tokenizer=self.tokenizer,
        )
        content_type, body = response_body(result, self.request.response_format)
        return list(whole_response(200, ((b"content-type", content_type), *self.extra_headers), body))

    def _fail(self, error: ProtocolError, failed_request_id: str | None) -> list[Output]:
        """End the call with `error`: its real status before the stream started, else an SSE error."""
        aborts = tuple(self._aborts(exclude=failed_request_id))
        self._done = True
        self._detecting = False
        for window in self.windows:
            if window.output.finish_reason is None:
                window.output.finish_reason = "abort"
        outputs: list[Output] = [Submit(aborts)] if aborts else []
        if self._committed:
            return [*outputs, Body(error_frame(error)), Body(DONE_FRAME), EndResponse()]
        headers = JSON_CONTENT_TYPE + self.extra_headers + retry_after(error.status)
        return [*outputs, *whole_response(error.status, headers, error.to_json())]

    def _aborts(self, exclude: str | None) -> list[Abort]:
        """Aborts for the detection step and every submitted window still running."""
        running = [self._detect_id] if self._detecting else []
        running += [
            window.request_id
            for window in self.windows
            if window.generate is not None and not window.output.finished
        ]
        return [Abort(request_id) for request_id in running if request_id != exclude]
