"""Test doubles for the runtime tests: a threaded scripted engine and a tiny stand-in for the core.

`ScriptedEngine` has the shape of `engine.engine.Engine` (start/submit/shutdown/healthy plus the
model facts) and runs a real thread that calls back once per step, so the bridges are exercised
exactly as with the real engine, in milliseconds. `EchoApp` is a minimal Sans-IO core: just enough
HTTP semantics (stream or not, status from the first engine output) to test the ASGI shell alone.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol.engine_api import Abort, Command, Encode, Event, Failed, Generate, SamplingParams, Tokens
from protocol.errors import ProtocolError
from protocol.outputs import Body, EndResponse, Output, StartResponse, Submit
from protocol.state import SERVING, Health, ServerStatus
from protocol.testing import EOS_ID, ByteTokenizer

_WAKE = Abort("")  # an inbox item that only wakes the engine thread up


@dataclass
class _Running:
    command: Generate
    emitted: int = 0


@dataclass
class ScriptedEngine:
    """Answers every `Generate` with `reply` (one byte token per step, then EOS), on its own thread.

    Every `Abort` received is put in `aborted` (tests wait on it). `hold_after`: a request stops producing after that many tokens until it is aborted (a
    stream that stays open). `gate`: no request produces anything until `gate` of them are
    running at once (proves the server let that many requests in concurrently).
    """

    reply: str = "Hello there!"
    hold_after: int | None = None
    gate: int = 1
    model_name: str = "scripted"
    max_model_len: int = 256
    healthy: bool = True
    tokenizer: ByteTokenizer = field(default_factory=ByteTokenizer)
    generation_defaults: dict = field(default_factory=dict)
    tasks: frozenset[str] = frozenset({"generate"})
    pooling: Any = None  # an embedding model's facts (hidden_size, is_matryoshka, ...); None: generative
    received: list[Command] = field(default_factory=list)
    aborted: queue.Queue[str] = field(default_factory=queue.Queue)
    steps: int = 0
    stopped: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.root = self.model_name
        self._inbox: queue.Queue[Command | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self, on_events: Callable[[list[Event]], None]) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(on_events,), name="scripted-engine", daemon=True
        )
        self._thread.start()

    def submit(self, commands: Sequence[Command]) -> None:
        for command in commands:
            self._inbox.put(command)

    def release(self, tokens: int | None = None) -> None:
        """Let held requests produce `tokens` more tokens (None: run to the end of their reply)."""
        self.hold_after = None if tokens is None or self.hold_after is None else self.hold_after + tokens
        self._inbox.put(_WAKE)

    def shutdown(self) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.stopped.set()

    def _run(self, on_events: Callable[[list[Event]], None]) -> None:
        running: dict[str, _Running] = {}
        reply_ids = list(self.reply.encode())
        while True:
            producing = len(running) >= self.gate and any(self._can_produce(r) for r in running.values())
            try:
                command = self._inbox.get(block=not producing)
                while True:
                    if command is None:
                        return
                    if command is _WAKE:
                        command = self._inbox.get_nowait()
                        continue
                    self.received.append(command)
                    failure = self._apply(command, running)
                    if failure is not None:
                        on_events([failure])
                    command = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if len(running) < self.gate:
                continue
            events = [self._next_token(run, reply_ids) for run in running.values() if self._can_produce(run)]
            for event in events:
                if event.finish_reason is not None:
                    del running[event.request_id]
            if events:
                self.steps += 1
                on_events(events)

    def _apply(self, command: Command, running: dict[str, _Running]) -> Event | None:
        if isinstance(command, Generate):
            running[command.request_id] = _Running(command)
        elif isinstance(command, Abort):
            running.pop(command.request_id, None)
            self.aborted.put(command.request_id)
        elif isinstance(command, Encode):
            return Failed(command.request_id, 400, "the scripted engine does not encode")
        return None

    def _can_produce(self, run: _Running) -> bool:
        return self.hold_after is None or run.emitted < self.hold_after

    @staticmethod
    def _next_token(run: _Running, reply_ids: list[int]) -> Tokens:
        command = run.command
        run.emitted += 1
        if run.emitted > len(reply_ids):
            token, finish = EOS_ID, "stop"
        else:
            token = reply_ids[run.emitted - 1]
            finish = "length" if run.emitted >= command.params.max_tokens else None
        return Tokens(
            command.request_id,
            0,
            (token,),
            num_prompt_tokens=len(command.prompt_token_ids),
            finish_reason=finish,
        )


# ---- a minimal core: POST /generate {"prompt", "max_tokens", "stream"} ----

JSON_HEADERS = ((b"content-type", b"application/json"),)
SSE_HEADERS = ((b"content-type", b"text/event-stream"),)


class ImmediateCall:
    model = None
    finished = True

    def __init__(self, status: int, body: bytes, headers=JSON_HEADERS) -> None:
        self._outputs = [StartResponse(status, headers), Body(body), EndResponse()]

    def start(self) -> list[Output]:
        return self._outputs

    def feed(self, events: Sequence[Event]) -> list[Output]:
        raise AssertionError("an immediate call gets no events")

    def disconnected(self) -> list[Command]:
        return []


class EchoCall:
    """Generates with the scripted engine; streams `data: <text>` frames or answers one JSON body."""

    def __init__(
        self, model: str, request_id: str, prompt: str, max_tokens: int, stream: bool, fail_late: bool
    ):
        self.model = model
        self.request_id = request_id
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.stream = stream
        self.fail_late = fail_late
        self.text = bytearray()
        self.started = False
        self.finished = False

    def start(self) -> list[Output]:
        prompt_ids = tuple(self.prompt.encode())
        params = SamplingParams(max_tokens=self.max_tokens)
        return [Submit((Generate(self.request_id, prompt_ids, params),))]

    def feed(self, events: Sequence[Event]) -> list[Output]:
        if self.fail_late and self.started:
            raise RuntimeError("a bug in the core")
        outputs: list[Output] = []
        for event in events:
            if isinstance(event, Failed):
                error = ProtocolError(event.message, event.status)
                self.finished = True
                return [StartResponse(event.status, JSON_HEADERS), Body(error.to_json()), EndResponse()]
            assert isinstance(event, Tokens)
            piece = bytes(t for t in event.token_ids if t < 256)
            self.text += piece
            if self.stream:
                if not self.started:
                    outputs.append(StartResponse(200, SSE_HEADERS))
                    self.started = True
                if piece:
                    outputs.append(Body(b"data: " + piece + b"\n\n"))
            if event.finish_reason is not None:
                self.finished = True
                if self.stream:
                    outputs += [Body(b"data: [DONE]\n\n"), EndResponse()]
                else:
                    body = json.dumps({"text": self.text.decode(), "finish_reason": event.finish_reason})
                    outputs += [StartResponse(200, JSON_HEADERS), Body(body.encode()), EndResponse()]
        return outputs

    def disconnected(self) -> list[Command]:
        return [] if self.finished else [Abort(self.request_id)]


class EchoApp:
    """Routes: GET /health, POST /generate (`fail_late`: `feed` raises once the response started),
    POST /boom (raises inside `handle`)."""

    def __init__(self, model: str = "scripted") -> None:
        self.model = model
        self.count = 0
        self.seen_paths: list[str] = []

    def handle(self, method: str, path: str, headers, body: bytes, *, status: ServerStatus = SERVING):
        self.seen_paths.append(path)
        if path == "/health":
            return ImmediateCall(200 if status.health is Health.SERVING else 503, b"")
        if path == "/boom":
            raise RuntimeError("a bug in the core")
        if method == "POST" and path == "/generate":
            request = json.loads(body)
            self.count += 1
            return EchoCall(
                self.model,
                f"req-{self.count}",
                request.get("prompt", ""),
                request.get("max_tokens", 64),
                request.get("stream", False),
                request.get("fail_late", False),
            )
        return ImmediateCall(404, ProtocolError("not found", 404).to_json())
