"""Embedding the Sans-IO core in another server: a bare, blocking h11 loop (no asyncio, trio or ASGI).

    python examples/h11_server.py [MODEL] --port 8000

It shows everything a host must do for the core: read a request, `app.handle(...)`, play the
call's outputs in order (`StartResponse`/`Body`/`EndResponse` become h11 events, `Submit` goes to
the engine), and hand the engine's events for the submitted request ids back to `call.feed`.
One connection and one request at a time, so it is a teaching aid, not a production server: a
client that leaves mid-stream is only noticed when a write fails (then its work is aborted).
"""

from __future__ import annotations

import argparse
import queue
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import h11

from protocol.app import App, AppConfig
from protocol.engine_api import Encode, Event, Generate
from protocol.model import ServedModel
from protocol.outputs import Body, Compute, EndResponse, Output, StartResponse, Submit, compute_inline

MAX_BODY_BYTES = 32 * 1024 * 1024



def _computed(call: Any, outputs: Sequence[Output]) -> Sequence[Output]:
    """Run a call's `Compute` (decoding an uploaded recording or image) here and feed it back; a
    server with a thread pool would run it there, so the loop keeps serving meanwhile."""
    while len(outputs) == 1 and isinstance(outputs[0], Compute):
        outputs = call.feed([compute_inline(outputs[0])])
    return outputs

class H11Server:
    """Serves `app` over h11 with `engine` (anything with `start(on_events)`, `submit`, `healthy`)."""

    def __init__(self, app: App, engine: Any) -> None:
        self.app = app
        self.engine = engine
        self.events: queue.Queue[list[Event]] = queue.Queue()
        engine.start(self.events.put)  # the engine thread hands over one list per step

    def serve_forever(self, listener: socket.socket) -> None:
        """Serve connections one after the other until `listener` is closed."""
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                self.serve_connection(connection)

    def serve_connection(self, connection: socket.socket) -> None:
        h11_connection = h11.Connection(h11.SERVER)
        while True:
            request = self._next_event(connection, h11_connection)
            if not isinstance(request, h11.Request):
                return
            body = bytearray()
            while isinstance(event := self._next_event(connection, h11_connection), h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    return
            if not isinstance(event, h11.EndOfMessage):
                return
            path = request.target.decode("latin-1")
            call = self.app.handle(request.method.decode(), path, request.headers, bytes(body))
            if not self._run_call(call, lambda data: connection.sendall(data), h11_connection):
                return
            if h11_connection.our_state is h11.MUST_CLOSE:
                return
            h11_connection.start_next_cycle()

    def _run_call(self, call: Any, write: Callable[[bytes], None], h11_connection: h11.Connection) -> bool:
        """Play the call to its end; False when the client went away (its engine work is aborted)."""
        request_ids: set[str] = set()
        outputs: Sequence[Output] = _computed(call, call.start())
        try:
            while True:
                for output in outputs:
                    self._play(output, write, h11_connection, request_ids)
                if call.finished:
                    return True
                outputs = call.feed([e for e in self.events.get() if e.request_id in request_ids])
        except OSError:
            self.engine.submit(call.disconnected())
            return False

    def _play(self, output: Output, write, h11_connection: h11.Connection, request_ids: set[str]) -> None:
        if isinstance(output, StartResponse):
            # no framing header: h11 picks chunked encoding for HTTP/1.1 clients
            write(h11_connection.send(h11.Response(status_code=output.status, headers=list(output.headers))))
        elif isinstance(output, Body):
            if output.data:
                write(h11_connection.send(h11.Data(data=output.data)))
        elif isinstance(output, EndResponse):
            write(h11_connection.send(h11.EndOfMessage()))
        elif isinstance(output, Submit):
            request_ids.update(c.request_id for c in output.commands if isinstance(c, Generate | Encode))
            self.engine.submit(output.commands)

    @staticmethod
    def _next_event(connection: socket.socket, h11_connection: h11.Connection) -> Any:
        while True:
            event = h11_connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                h11_connection.receive_data(connection.recv(65536))
            except OSError:
                return h11.ConnectionClosed()


def build(engine: Any, model_name: str) -> App:
    model = ServedModel(
        names=[model_name],
        root=engine.root,
        tokenizer=engine.tokenizer,
        max_model_len=engine.max_model_len,
        generation_defaults=dict(engine.generation_defaults),
        created=int(time.time()),
    )
    return App(AppConfig(), [model], clock=time.time, new_id=lambda: uuid.uuid4().hex)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="SmolLM2-135M-Instruct")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    from engine import Engine, EngineConfig

    listener = socket.create_server((args.host, args.port))
    engine = Engine(EngineConfig(model=args.model))
    print(f"serving {args.model} on http://{args.host}:{args.port}")
    try:
        H11Server(build(engine, args.model), engine).serve_forever(listener)
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
