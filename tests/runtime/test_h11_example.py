"""examples/h11_server.py: the protocol core embedded in a bare blocking h11 loop (scripted engine)."""

from __future__ import annotations

import importlib.util
import socket
import threading
from pathlib import Path

import httpx
import openai

from tests.runtime.fakes import ScriptedEngine

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "h11_server.py"
REPLY = "Bonjour!"


def load_example():
    spec = importlib.util.spec_from_file_location("h11_server_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_h11_loop_serves_the_openai_api():
    example = load_example()
    engine = ScriptedEngine(reply=REPLY)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = example.H11Server(example.build(engine, "tiny"), engine)
    thread = threading.Thread(target=server.serve_forever, args=(listener,), daemon=True)
    thread.start()
    try:
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30
        ) as client:
            messages = [{"role": "user", "content": "hi"}]
            plain = client.chat.completions.create(model="tiny", messages=messages)
            streamed = client.chat.completions.create(model="tiny", messages=messages, stream=True)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
            missing = httpx.get(f"http://127.0.0.1:{port}/nowhere", timeout=30)
        assert plain.choices[0].message.content == REPLY
        assert text == REPLY
        assert missing.status_code == 404
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        thread.join(timeout=30)
        engine.shutdown()
    assert not thread.is_alive()
