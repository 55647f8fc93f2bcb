"""Serving flags end to end through the assembled app: `--config FILE.yaml`, `--uds`, request logging.

(`--root-path` with and without the prefix is in test_openai_client.py and below through a config
file; the flags' parsing alone is in test_cli_args.py.)
"""

from __future__ import annotations

import logging
import re

import httpx
import openai
import pytest

from sansllm.args import parse_serve_args
from sansllm.assemble import build_asgi_app
from sansllm.listen import hypercorn_config_from_args
from tests.runtime.fakes import ScriptedEngine
from tests.runtime.server import BRIDGES, ServerThread
from tests.runtime.test_openai_client import MESSAGES, MODEL, REPLY, client_for, serve

CONFIG = """\
model: from-the-file                       # replaced by the command line's MODEL
served-model-name: [alias, other]          # a list flag
api_key: [file-key-1, file-key-2]          # another, replaced by the command line's --api-key
enable-request-id-headers: true            # a boolean
allowed-origins: ["https://app.example"]   # a JSON-list flag, given as a YAML list
root-path: /from-file
max_logprobs: 2
"""


def test_a_config_file_configures_the_served_app_and_the_command_line_wins(runtime, tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(CONFIG)
    with (
        serve(runtime, "--config", str(path), "--api-key", "cli-key") as server,
        client_for(server, api_key="file-key-1") as file_key,
        openai.OpenAI(base_url=f"{server.url}/from-file/v1", api_key="cli-key", max_retries=0, timeout=30) as client,
    ):
        with pytest.raises(openai.AuthenticationError):  # the command line's keys replaced the file's
            file_key.models.list()
        assert [model.id for model in client.models.list().data] == ["alias"]
        response = client.chat.completions.with_raw_response.create(model="other", messages=MESSAGES)
        assert response.parse().choices[0].message.content == REPLY
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
        with pytest.raises(openai.BadRequestError, match="greater than max allowed: 2"):  # the file's max_logprobs
            client.chat.completions.create(model="alias", messages=MESSAGES, logprobs=True, top_logprobs=3)
        allowed = httpx.get(
            f"{server.url}/health", headers={"origin": "https://app.example"}, timeout=30
        ).headers.get("access-control-allow-origin")
        refused = httpx.get(
            f"{server.url}/health", headers={"origin": "https://other.example"}, timeout=30
        ).headers.get("access-control-allow-origin")
        assert (allowed, refused) == ("https://app.example", None)


def test_a_unix_socket_server_answers_the_openai_client(runtime, tmp_path):
    args = parse_serve_args([MODEL, "--uds", str(tmp_path / "sansllm.sock")], environ={})
    bind = hypercorn_config_from_args(args).bind  # what `sansllm serve --uds` binds
    asgi_app = build_asgi_app(args, [ScriptedEngine(reply=REPLY)], BRIDGES[runtime])
    with ServerThread(asgi_app, runtime, configure=lambda config: setattr(config, "bind", bind)) as server:
        assert server.uds == str(tmp_path / "sansllm.sock")
        http_client = httpx.Client(transport=httpx.HTTPTransport(uds=server.uds), timeout=30)
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", http_client=http_client, max_retries=0) as client:
            assert [model.id for model in client.models.list().data] == [MODEL]
            completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert completion.choices[0].message.content == REPLY
            chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == REPLY


def test_requests_and_aborts_are_logged_with_prompts_cut_at_max_log_len(runtime, caplog):
    engine = ScriptedEngine(reply=REPLY, hold_after=2)  # streams stay open until the client leaves
    with (
        caplog.at_level(logging.INFO, logger="protocol.asgi"),
        serve(runtime, "--enable-log-requests", "--max-log-len", "4", engine=engine) as server,
        client_for(server) as client,
    ):
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        next(iter(stream))
        stream.close()
        request_id = engine.aborted.get(timeout=10)
        (generate,) = [command for command in engine.received if type(command).__name__ == "Generate"]
    assert request_id == generate.request_id
    lines = [record.getMessage() for record in caplog.records if request_id in record.getMessage()]
    more = len(generate.prompt_token_ids) - 4
    first_four = list(generate.prompt_token_ids[:4])
    assert lines[0].startswith(f"Received request {request_id}: prompt_token_ids: {first_four} (+{more} more), params:")
    assert "max_tokens=" in lines[0]
    assert lines[1:] == [f"Aborted request {request_id}"]


def test_without_the_flag_nothing_is_logged(runtime, caplog):
    with (
        caplog.at_level(logging.INFO, logger="protocol.asgi"),
        serve(runtime) as server,
        client_for(server) as client,
    ):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert not [record for record in caplog.records if "Received request" in record.getMessage()]
