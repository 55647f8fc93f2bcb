"""Test doubles for the protocol core: a byte-level tokenizer, tiny served models, a call player.

`ByteTokenizer` makes every UTF-8 byte a token, so a multi-byte character spans several tokens:
exactly the case incremental detokenization must get right. It needs no files and no downloads.
`CallPlayer` plays a call's outputs the way a runtime does, without one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Self

from protocol.engine_api import Abort, Generate
from protocol.media.spec import ImageProcessing, MultimodalSpec, SpeechSpec
from protocol.model import PoolingInfo, ServedModel
from protocol.outputs import Body, Compute, EndResponse, Fetch, StartResponse, Submit, compute_inline

BOS_ID = 256
EOS_ID = 257
IM_START_ID = 258
IM_END_ID = 259
IMAGE_ID = 260  # `<image>`, in `ByteTokenizer(vision=True)` only
# Whisper's special tokens in `ByteTokenizer(speech=True)`, in Whisper's order: `<|endoftext|>` first,
# the languages, the tasks, then `<|notimestamps|>` and the 1501 timestamps <|0.00|> .. <|30.00|>
SPEECH_LANGUAGES = ("en", "fr", "de")
END_OF_TEXT_ID = 261
START_OF_TRANSCRIPT_ID = 262
LANGUAGE_IDS = {code: 263 + i for i, code in enumerate(SPEECH_LANGUAGES)}  # 263 .. 265
TRANSLATE_ID = 266
TRANSCRIBE_ID = 267
START_OF_PREV_ID = 268
NO_SPEECH_ID = 269
NO_TIMESTAMPS_ID = 270
TIMESTAMP_BEGIN_ID = 271  # <|0.00|>
TIMESTAMP_COUNT = 1501
SPEECH_TOKENS: dict[str, int] = {
    "<|endoftext|>": END_OF_TEXT_ID,
    "<|startoftranscript|>": START_OF_TRANSCRIPT_ID,
    **{f"<|{code}|>": token for code, token in LANGUAGE_IDS.items()},
    "<|translate|>": TRANSLATE_ID,
    "<|transcribe|>": TRANSCRIBE_ID,
    "<|startofprev|>": START_OF_PREV_ID,
    "<|nospeech|>": NO_SPEECH_ID,
    "<|notimestamps|>": NO_TIMESTAMPS_ID,
}


def timestamp_id(seconds: float) -> int:
    """The id of Whisper's timestamp token for `seconds` into a window (0.02 s steps)."""
    return TIMESTAMP_BEGIN_ID + round(seconds / 0.02)


SPECIAL_TOKENS: dict[str, int] = {
    "<s>": BOS_ID,
    "</s>": EOS_ID,
    "<|im_start|>": IM_START_ID,
    "<|im_end|>": IM_END_ID,
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ByteTokenizer:
    """Ids 0..255 are bytes; 256..259 are `<s>`, `</s>`, `<|im_start|>`, `<|im_end|>`.

    Special-token strings inside the text are encoded as their ids (as HF tokenizers do), so a
    rendered chat template tokenizes the way a real model's would. `add_special_tokens` prepends
    `<s>`. Both `</s>` and `<|im_end|>` end generation. `vision=True` adds `<image>` (260);
    `speech=True` adds Whisper's special tokens and timestamps from 261 (`SPEECH_TOKENS`), and
    `<|endoftext|>` ends generation too.
    """

    def __init__(
        self, chat_template: str | None = CHATML_TEMPLATE, *, vision: bool = False, speech: bool = False
    ):
        self._chat_template = chat_template
        self._specials = dict(SPECIAL_TOKENS, **({"<image>": IMAGE_ID} if vision else {}))
        if speech:
            self._specials.update(SPEECH_TOKENS)
        self._names = {token_id: name for name, token_id in self._specials.items()}
        if speech:  # timestamps decode to their names but are not matched in text (too many to scan)
            self._names.update(
                {TIMESTAMP_BEGIN_ID + i: f"<|{i * 0.02:.2f}|>" for i in range(TIMESTAMP_COUNT)}
            )
        self._speech = speech

    @property
    def vocab_size(self) -> int:
        return max(self._names) + 1

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({EOS_ID, IM_END_ID, *((END_OF_TEXT_ID,) if self._speech else ())})

    @property
    def all_special_ids(self) -> frozenset[int]:
        return frozenset(self._names)

    @property
    def bos_token(self) -> str | None:
        return "<s>"

    @property
    def eos_token(self) -> str | None:
        return "</s>"

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS_ID] if add_special_tokens else []
        position = 0
        while position < len(text):
            special = self._special_at(text, position)
            if special is not None:
                ids.append(self._specials[special])
                position += len(special)
                continue
            end = self._next_special(text, position)
            ids.extend(text[position:end].encode("utf-8", errors="surrogatepass"))
            position = end
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        pieces: list[str] = []
        pending = bytearray()
        for token_id in token_ids:
            if 0 <= token_id < 256:
                pending.append(token_id)
                continue
            if token_id not in self._names:
                raise ValueError(f"Token id {token_id} is out of vocabulary")
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if not skip_special_tokens:
                pieces.append(self._names[token_id])
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """Printable ASCII bytes as themselves, other bytes as `<0xNN>` (sentencepiece style)."""
        tokens = []
        for token_id in token_ids:
            if token_id in self._names:
                tokens.append(self._names[token_id])
            elif 0x20 <= token_id < 0x7F:
                tokens.append(chr(token_id))
            elif 0 <= token_id < 256:
                tokens.append(f"<0x{token_id:02X}>")
            else:
                raise ValueError(f"Token id {token_id} is out of vocabulary")
        return tokens

    def encode_pair(
        self, text: str, text_pair: str, add_special_tokens: bool = True, *, max_length: int | None = None
    ) -> tuple[list[int], list[int]]:
        """`<s> a </s> b </s>` with token types `0 .. 0 1 .. 1` (the `</s>` after `a` is segment 0).

        `max_length` trims the longer text first, from its end (HF's `longest_first`, right side).
        """
        first = self.encode(text, add_special_tokens=False)
        second = self.encode(text_pair, add_special_tokens=False)
        specials = 3 if add_special_tokens else 0
        excess = 0 if max_length is None else len(first) + len(second) + specials - max_length
        while excess > 0 and (first or second):
            (first if len(first) > len(second) else second).pop()
            excess -= 1
        if not add_special_tokens:
            return first + second, [0] * len(first) + [1] * len(second)
        ids = [BOS_ID, *first, EOS_ID, *second, EOS_ID]
        return ids, [0] * (len(first) + 2) + [1] * (len(second) + 1)

    def _special_at(self, text: str, position: int) -> str | None:
        for name in self._specials:
            if text.startswith(name, position):
                return name
        return None

    def _next_special(self, text: str, position: int) -> int:
        found = [text.find(name, position) for name in self._specials]
        return min((index for index in found if index > position), default=len(text))


def tiny_served_model(max_model_len: int = 256, name: str = "tiny-byte-model") -> ServedModel:
    """A generative model as the API sees it, backed by `ByteTokenizer`."""
    return ServedModel(names=[name], root=name, tokenizer=ByteTokenizer(), max_model_len=max_model_len)


def tiny_vision_model(
    image_tokens: int = 4,
    *,
    crop: int = 8,
    max_model_len: int = 256,
    name: str = "tiny-vision-model",
    tasks: Iterable[str] = ("generate",),
    **spec: object,
) -> ServedModel:
    """A LLaVA-style model as the API sees it: `ByteTokenizer(vision=True)`, each image `image_tokens`
    positions, resized and cropped to `crop` x `crop` pixels. `tasks=("embed",)`: one served with
    `--convert embed` (8-d embeddings)."""
    multimodal = MultimodalSpec(
        modalities=frozenset({"image"}),
        image_token="<image>",
        image_token_id=IMAGE_ID,
        image_tokens=image_tokens,
        image=ImageProcessing(shortest_edge=crop, crop_height=crop, crop_width=crop),
        **spec,  # type: ignore[arg-type]
    )
    served = frozenset(tasks)
    return ServedModel(
        names=[name],
        root=name,
        tokenizer=ByteTokenizer(vision=True),
        max_model_len=max_model_len,
        tasks=served,
        pooling=None if served == {"generate"} else PoolingInfo(hidden_size=8),
        multimodal=multimodal,
    )


def tiny_pooling_model(
    tasks: Iterable[str] = ("embed",),
    *,
    max_model_len: int = 256,
    name: str = "tiny-pooling-model",
    hidden_size: int = 8,
    is_matryoshka: bool = False,
    matryoshka_dimensions: Sequence[int] | None = None,
    id2label: dict[int, str] | None = None,
) -> ServedModel:
    """A pooling model as the API sees it (embedding, classifier or cross-encoder), on `ByteTokenizer`.

    `tasks` are vLLM's pooling tasks: ("embed",) for an embedding model, ("classify", "score") for
    a cross-encoder, ("classify",) for a classifier, and "token_embed"/"token_classify".
    """
    labels = dict(id2label or {})
    pooling = PoolingInfo(
        hidden_size=hidden_size,
        is_matryoshka=is_matryoshka,
        matryoshka_dimensions=tuple(matryoshka_dimensions) if matryoshka_dimensions is not None else None,
        num_labels=len(labels),
        id2label=labels,
    )
    return ServedModel(
        names=[name],
        root=name,
        tokenizer=ByteTokenizer(chat_template=CHATML_TEMPLATE),
        max_model_len=max_model_len,
        tasks=frozenset(tasks),
        pooling=pooling,
    )


def tiny_speech_model(
    *,
    multilingual: bool = True,
    name: str = "tiny-speech-model",
    max_target_tokens: int = 448,
    window_seconds: float = 30.0,
    sample_rate: int = 16000,
) -> ServedModel:
    """A Whisper-style speech-to-text model as the API sees it: `ByteTokenizer(speech=True)` (text is
    bytes; Whisper's special tokens and timestamps from id 261, see `SPEECH_TOKENS`). Multilingual:
    "en", "fr", "de" and translation; `multilingual=False`: English-only, as tiny.en."""
    spec = SpeechSpec(
        sample_rate=sample_rate,
        window_seconds=window_seconds,
        max_target_tokens=max_target_tokens,
        start_of_transcript=START_OF_TRANSCRIPT_ID,
        transcribe=TRANSCRIBE_ID,
        translate=TRANSLATE_ID if multilingual else None,
        no_timestamps=NO_TIMESTAMPS_ID,
        start_of_prev=START_OF_PREV_ID,
        timestamp_begin=TIMESTAMP_BEGIN_ID,
        end_of_text=END_OF_TEXT_ID,
        languages=dict(LANGUAGE_IDS) if multilingual else {},
    )
    return ServedModel(
        names=[name],
        root=name,
        tokenizer=ByteTokenizer(chat_template=None, speech=True),
        max_model_len=max_target_tokens,
        tasks=frozenset({"transcription"}),
        speech=spec,
    )


class CallPlayer:
    """Plays a call's outputs as a runtime does and records what the client and the engine receive.

    Asserts the output contract on the way (one status, no body before it or after the end); runs
    `Compute` work in place and records `Fetch` requests for the test to answer with `feed`.
    """

    def __init__(self, call: Any) -> None:
        self.call = call
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.ended = False
        self.commands: list = []
        self.fetches: list = []
        self._play(call.start())

    def feed(self, *events: Any) -> Self:
        """Engine events (or fetch results) into the call; its outputs are played."""
        self._play(self.call.feed(list(events)))
        return self

    def _play(self, outputs: Iterable[Any]) -> None:
        for output in outputs:
            if isinstance(output, StartResponse):
                assert self.status is None, "status committed twice"
                self.status, self.headers = output.status, dict(output.headers)
            elif isinstance(output, Body):
                assert self.status is not None and not self.ended, "body outside the response"
                self.body += output.data
            elif isinstance(output, EndResponse):
                assert self.status is not None and not self.ended, "response ended twice or unstarted"
                self.ended = True
            elif isinstance(output, Fetch):
                self.fetches.extend(output.requests)
            elif isinstance(output, Compute):  # decoding media, which a server runs on a worker thread
                self._play(self.call.feed([compute_inline(output)]))
            else:
                assert isinstance(output, Submit), output
                self.commands.extend(output.commands)

    @property
    def generates(self) -> list[Generate]:
        return [command for command in self.commands if isinstance(command, Generate)]

    @property
    def generate(self) -> Generate:
        (generate,) = self.generates
        return generate

    @property
    def aborts(self) -> list[Abort]:
        return [command for command in self.commands if isinstance(command, Abort)]

    def json(self) -> Any:
        assert self.ended, (self.status, self.body)
        return json.loads(self.body)

    def error(self, status: int = 400) -> dict:
        """The OpenAI error of a finished response with `status` (its `code` checked too)."""
        assert self.ended and self.status == status, (self.status, self.body)
        error = self.json()["error"]
        assert error["code"] == status, error
        return error

    def events(self) -> list:
        """The SSE payloads, parsed; asserts the framing and the final `[DONE]`."""
        assert self.ended and self.headers[b"content-type"].startswith(b"text/event-stream")
        frames = self.body.split(b"\n\n")
        assert frames[-1] == b"" and frames[-2] == b"data: [DONE]", self.body[-200:]
        payloads = []
        for frame in frames[:-2]:
            assert frame.startswith(b"data: ") and b"\n" not in frame, frame
            payloads.append(json.loads(frame[6:]))
        return payloads
