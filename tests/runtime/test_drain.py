"""Graceful drain (what SIGTERM starts), under both runtimes, with a scripted engine.

Streams in flight finish; meanwhile /health answers 503 and new requests get a 503 with
Retry-After; streams still running at --shutdown-timeout end with an SSE error frame and their
engine work is aborted. (tests/runtime/test_e2e_drain.py sends a real SIGTERM to `sansllm serve`.)
"""

from __future__ import annotations

import json
import threading

import httpx

from sansllm.args import parse_serve_args
from sansllm.assemble import build_asgi_app
from tests.runtime.fakes import ScriptedEngine
from tests.runtime.server import BRIDGES, ServerThread

MODEL = "scripted-model"
REPLY = "Paris, of course."
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], "stream": True}


def serve(runtime: str, engine: ScriptedEngine, *flags: str) -> ServerThread:
    args = parse_serve_args([MODEL, *flags], environ={})
    return ServerThread(build_asgi_app(args, [engine], BRIDGES[runtime]), runtime)


class Streams:
    """`count` streaming chat requests on their own threads; `started` once each got its first chunk."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.frames: list[list[str]] = [[] for _ in range(count)]
        self.statuses: list[int | None] = [None] * count
        self._first = threading.Semaphore(0)
        self._threads = [threading.Thread(target=self._stream, args=(i,), daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def started(self, timeout: float = 30) -> bool:
        return all(self._first.acquire(timeout=timeout) for _ in self._threads)

    def join(self, timeout: float = 30) -> bool:
        for thread in self._threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in self._threads)

    def _stream(self, i: int) -> None:
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=BODY, timeout=60) as response:
            self.statuses[i] = response.status_code
            first = True
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.frames[i].append(line[len("data: ") :])
                    if first:
                        first = False
                        self._first.release()


def text_of(frames: list[str]) -> str:
    chunks = [json.loads(frame) for frame in frames if frame != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_drain_lets_streams_finish_while_refusing_new_work(runtime):
    engine = ScriptedEngine(reply=REPLY, hold_after=2)  # every stream stays open after two tokens
    server = serve(runtime, engine, "--enable-server-load-tracking")
    with server:
        streams = Streams(server.url, 5)
        assert streams.started()
        assert httpx.get(f"{server.url}/load", timeout=10).json() == {"server_load": 5}
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        server.begin_shutdown()
        health = httpx.get(f"{server.url}/health", timeout=10)
        while health.status_code == 200:  # the drain starts on the server's loop, a moment later
            health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 503
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=BODY, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "shutting down" in refused.json()["error"]["message"]
        assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200  # still answered
        engine.release()  # the streams run to their end
        assert streams.join()
        assert server.wait_stopped()
    assert streams.statuses == [200] * 5
    for frames in streams.frames:
        assert frames[-1] == "[DONE]" and text_of(frames) == REPLY
        assert not any('"error"' in frame for frame in frames)
    assert engine.aborted.empty()


def test_streams_still_running_at_the_shutdown_timeout_end_with_an_error_frame(runtime):
    engine = ScriptedEngine(reply=REPLY, hold_after=2)  # never released: they would run forever
    server = serve(runtime, engine, "--shutdown-timeout", "0.5")
    with server:
        streams = Streams(server.url, 3)
        assert streams.started()
        server.begin_shutdown()
        assert streams.join() and server.wait_stopped()
    generates = {c.request_id for c in engine.received if type(c).__name__ == "Generate"}
    assert {engine.aborted.get(timeout=5) for _ in range(3)} == generates
    for frames in streams.frames:
        assert frames[-1] == "[DONE]"
        error = json.loads(frames[-2])["error"]
        assert error["code"] == 503 and "shut down before request" in error["message"]
        assert text_of(frames[:-2]) == REPLY[:2]  # what was generated before the cut arrived whole


def test_load_is_zero_without_load_tracking(runtime):
    with serve(runtime, ScriptedEngine(reply=REPLY)) as server:
        assert httpx.get(f"{server.url}/load", timeout=10).json() == {"server_load": 0}
