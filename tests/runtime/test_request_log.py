"""--enable-log-requests / --max-log-len: what reaches the engine is logged, prompts cut short."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from protocol.asgi import log_commands
from protocol.engine_api import Abort, Generate, SamplingParams
from protocol.testing import ByteTokenizer
from sansllm.args import parse_serve_args
from sansllm.assemble import build_asgi_app


def test_requests_are_logged_with_their_prompt_ids_cut_at_max_log_len(caplog):
    generate = Generate("chatcmpl-1", tuple(range(1, 11)), SamplingParams(max_tokens=5))
    with caplog.at_level(logging.INFO, logger="protocol.asgi"):
        log_commands([generate, Abort("chatcmpl-1")], max_log_len=3)
    received, aborted = caplog.messages
    assert received.startswith("Received request chatcmpl-1: prompt_token_ids: [1, 2, 3] (+7 more), params:")
    assert "max_tokens=5" in received
    assert aborted == "Aborted request chatcmpl-1"


def test_the_flags_reach_the_served_app():
    args = parse_serve_args(["SmolLM2-135M-Instruct", "--enable-log-requests", "--max-log-len", "16"], environ={})
    engine = SimpleNamespace(
        root="/m", tokenizer=ByteTokenizer(), max_model_len=64, tasks={"generate"}, pooling=None, generation_defaults={}
    )
    app = build_asgi_app(args, [engine], lambda engine: engine)
    assert (app.log_requests, app.max_log_len) == (True, 16)
    assert parse_serve_args([], environ={}).enable_log_requests is False
