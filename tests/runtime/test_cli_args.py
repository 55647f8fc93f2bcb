"""`sansllm serve` flags: parsing, config files, environment, chat templates, listening setup."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest

from sansllm.args import DEFAULT_MODEL, human_readable_int, parse_serve_args
from sansllm.assemble import app_config_from_args, engine_config_from_args
from sansllm.chat_template import load_chat_template
from sansllm.cli import main
from sansllm.listen import bind_early, hypercorn_config_from_args


def parse(*argv: str, environ=None, **kwargs):
    return parse_serve_args(list(argv), environ=environ or {}, **kwargs)


def test_defaults_match_the_documented_ones():
    args = parse()
    assert args.model == DEFAULT_MODEL
    assert (args.runtime, args.host, args.port, args.uds) == ("asyncio", "127.0.0.1", 8000, None)
    assert args.http2 is True
    assert args.api_key == []
    assert args.response_role == "assistant"
    assert args.max_logprobs == 20
    assert args.root_path == ""
    assert args.max_model_len is None


def test_every_flag_parses():
    args = parse(
        "my-model",
        "--runtime", "trio",
        "--host", "::1", "--port", "9001",
        "--certfile", "c.pem", "--keyfile", "k.pem",
        "--no-http2",
        "--root-path", "/llm",
        "--api-key", "k1", "k2",
        "--served-model-name", "a", "b",
        "--chat-template", "{{ x }}",
        "--chat-template-content-format", "openai",
        "--trust-request-chat-template",
        "--response-role", "bot",
        "--max-model-len", "2K",
        "--dtype", "bfloat16",
        "--seed", "7",
        "--max-logprobs", "5",
        "--enable-prompt-tokens-details",
        "--enable-force-include-usage",
        "--return-tokens-as-token-ids",
        "--enable-request-id-headers",
        "--max-num-seqs", "8",
        "--max-num-batched-tokens", "4k",
        "--kv-cache-memory", "1G",
        "--batch-invariant",
        "--log-level", "WARNING",
    )  # fmt: skip
    assert args.model == "my-model" and args.runtime == "trio"
    assert (args.host, args.port, args.ssl_certfile, args.ssl_keyfile) == ("::1", 9001, "c.pem", "k.pem")
    assert args.http2 is False and args.root_path == "/llm"
    assert args.api_key == ["k1", "k2"] and args.served_model_name == ["a", "b"]
    assert args.chat_template_content_format == "openai" and args.trust_request_chat_template
    assert (args.response_role, args.max_model_len, args.dtype, args.seed) == ("bot", 2048, "bfloat16", 7)
    assert args.enable_prompt_tokens_details and args.enable_force_include_usage
    assert args.return_tokens_as_token_ids and args.enable_request_id_headers
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.kv_cache_memory) == (8, 4000, 2**30)
    assert args.batch_invariant and args.log_level == "warning"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2048", 2048),
        ("1k", 1000),
        ("1K", 1024),
        ("25.6k", 25600),
        ("2m", 2_000_000),
        ("1M", 2**20),
        ("3G", 3 * 2**30),
    ],
)
def test_human_readable_sizes(text, value):
    assert human_readable_int(text) == value


@pytest.mark.parametrize("text", ["1.5K", "abc", "1.2345k", "k"])
def test_bad_sizes_are_refused(text, capsys):
    with pytest.raises(SystemExit):
        parse("--max-model-len", text)
    assert "--max-model-len" in capsys.readouterr().err


def test_api_keys_come_from_the_environment_when_no_flag_is_given():
    assert parse(environ={"SANSLLM_API_KEY": "s", "VLLM_API_KEY": "v"}).api_key == ["s"]
    assert parse(environ={"VLLM_API_KEY": "v"}).api_key == ["v"]
    assert parse("--api-key", "flag", environ={"VLLM_API_KEY": "v"}).api_key == ["flag"]


def test_config_file_is_overridden_by_the_command_line_whatever_the_order(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "model: from-file\nport: 9000\nhttp2: false\napi_key: [a, b]\nmax_model_len: 1K\n"
        "enable-request-id-headers: true\nserved-model-name: [x]\n"
    )
    before = parse("--port", "1234", "--config", str(config))
    after = parse("--config", str(config), "--port", "1234")
    for args in (before, after):
        assert args.port == 1234
        assert args.model == "from-file"
        assert args.http2 is False
        assert args.api_key == ["a", "b"]
        assert args.max_model_len == 1024
        assert args.enable_request_id_headers is True
        assert args.served_model_name == ["x"]
    assert parse("cli-model", "--config", str(config), "--http2").model == "cli-model"
    assert parse("cli-model", "--config", str(config), "--http2").http2 is True


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("serve.json", "{}", "must be a .yaml or .yml file"),
        ("serve.yaml", "- a\n- b\n", "must hold a mapping"),
        ("serve.yaml", "no_such_flag: 1\n", "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, capsys, name, content, message):
    config = tmp_path / name
    config.write_text(content)
    with pytest.raises(SystemExit):
        parse("--config", str(config))
    assert message in capsys.readouterr().err


def test_runtime_entry_points_fix_the_runtime(capsys):
    assert parse(runtime="trio").runtime == "trio"
    with pytest.raises(SystemExit):
        parse("--runtime", "asyncio", runtime="trio")
    assert "unrecognized arguments: --runtime" in capsys.readouterr().err


def test_sansllm_without_serve_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "serve" in capsys.readouterr().err


def test_chat_template_from_a_file_or_inline(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}\n")
    assert load_chat_template(str(path)) == "{{ messages[0]['content'] }}\n"
    assert load_chat_template("{{ a }}\\n{{ b }} é中") == "{{ a }}\n{{ b }} é中"
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_hypercorn_config_follows_the_flags():
    plain = hypercorn_config_from_args(parse("--host", "::1", "--port", "9001", "--no-http2"))
    assert plain.bind == ["[::1]:9001"]
    assert plain.alpn_protocols == ["http/1.1"]
    assert not plain.ssl_enabled
    tls = hypercorn_config_from_args(parse("--ssl-certfile", "both.pem"))
    assert (tls.certfile, tls.keyfile) == ("both.pem", "both.pem")
    assert tls.alpn_protocols == ["h2", "http/1.1"]
    assert hypercorn_config_from_args(parse("--uds", "/tmp/x.sock")).bind == ["unix:/tmp/x.sock"]


def test_sockets_are_bound_before_serving(tmp_path):
    config = hypercorn_config_from_args(parse("--port", "0"))
    (address,) = bind_early(config)
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    # already listening: a client connects before any server loop runs
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
        pass
    (fd_bind,) = config.bind
    assert fd_bind.startswith("fd://")
    socket.socket(fileno=int(fd_bind[5:])).close()

    uds = hypercorn_config_from_args(parse("--uds", str(tmp_path / "s.sock")))
    assert bind_early(uds) == [f"unix:{tmp_path / 's.sock'}"]
    socket.socket(fileno=int(uds.bind[0][5:])).close()


def test_a_busy_port_fails_at_once():
    config = hypercorn_config_from_args(parse("--port", "0"))
    (address,) = bind_early(config)
    busy = hypercorn_config_from_args(parse("--port", address.rsplit(":", 1)[1]))
    try:
        with pytest.raises(OSError):
            bind_early(busy)
    finally:
        socket.socket(fileno=int(config.bind[0][5:])).close()


def test_engine_config_takes_the_engine_flags():
    from engine.engine import EngineConfig

    args = parse(
        "some-model", "--max-model-len", "2k", "--dtype", "half", "--seed", "3",
        "--max-num-seqs", "4", "--max-num-batched-tokens", "1K",
    )  # fmt: skip
    config = engine_config_from_args(args, EngineConfig)
    assert (config.model, config.max_model_len, config.dtype, config.seed) == (
        "some-model",
        2000,
        "float16",
        3,
    )
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (4, 1024)
    defaults = engine_config_from_args(parse(), EngineConfig)
    assert defaults == EngineConfig(model=DEFAULT_MODEL, dtype="auto")


def test_flags_the_engine_does_not_know_yet_are_reported_not_fatal(caplog):
    @dataclass
    class SmallConfig:
        model: str
        dtype: str = "auto"

    config = engine_config_from_args(parse("m", "--kv-cache-memory", "1G", "--batch-invariant"), SmallConfig)
    assert config == SmallConfig("m")
    assert "--kv-cache-memory is ignored" in caplog.text
    assert "--batch-invariant is ignored" in caplog.text


def test_app_config_takes_the_api_flags(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    args = parse(
        "--api-key", "k", "--response-role", "bot", "--max-logprobs", "3", "--chat-template", str(template),
        "--chat-template-content-format", "string", "--trust-request-chat-template",
        "--enable-prompt-tokens-details", "--enable-force-include-usage", "--return-tokens-as-token-ids",
        "--enable-request-id-headers", "--root-path", "/r",
    )  # fmt: skip
    config = app_config_from_args(args)
    assert config.api_keys == ["k"]
    assert (config.response_role, config.max_logprobs, config.chat_template) == ("bot", 3, "{{ messages }}")
    assert config.chat_template_content_format == "string" and config.trust_request_chat_template
    assert config.enable_prompt_tokens_details and config.enable_force_include_usage
    assert config.return_tokens_as_token_ids and config.enable_request_id_headers
    assert config.root_path == "/r"
