"""A bare HTTP/2 client over a socket (h2c, prior knowledge), for what httpx cannot do: reset a stream."""

from __future__ import annotations

import json
import socket

import h2.config
import h2.connection
import h2.errors
import h2.events


class H2cConnection:
    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self._flush()
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()

    def __enter__(self) -> H2cConnection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.sock.close()

    def post(self, path: str, payload: dict) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        body = json.dumps(payload).encode()
        headers = [
            (":method", "POST"),
            (":path", path),
            (":scheme", "http"),
            (":authority", "127.0.0.1"),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]
        self.h2.send_headers(stream_id, headers)
        self.h2.send_data(stream_id, body, end_stream=True)
        self._flush()
        self.data[stream_id] = bytearray()
        return stream_id

    def read_data(self, stream_id: int) -> bytes:
        """Wait for body bytes on `stream_id` and return (and consume) what has arrived."""
        while not self.data[stream_id] and stream_id not in self.ended:
            self._receive()
        chunk = bytes(self.data[stream_id])
        self.data[stream_id].clear()
        return chunk

    def read_until_end(self, stream_id: int) -> bytes:
        while stream_id not in self.ended:
            self._receive()
        return bytes(self.data.pop(stream_id))

    def reset(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self._flush()

    def _receive(self) -> None:
        received = self.sock.recv(65536)
        if not received:
            raise ConnectionError("the server closed the connection")
        for event in self.h2.receive_data(received):
            if isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_id in self.data:
                    self.data[event.stream_id] += event.data
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended.add(event.stream_id)
        self._flush()

    def _flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())
