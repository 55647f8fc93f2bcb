"""`sansllm serve` flags: parsing, config files, environment, chat templates, listening setup."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass

import pytest

from sansllm.args import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, human_readable_int, parse_serve_args
from sansllm.assemble import (
    ModelLoadError,
    app_config_from_args,
    engine_config_from_args,
    engine_configs_from_args,
    load_engines,
)
from sansllm.chat_template import load_chat_template
from sansllm.cli import main
from sansllm.launch import launch
from sansllm.listen import bind_early, hypercorn_config_from_args


def parse(*argv: str, environ=None, **kwargs):
    return parse_serve_args(list(argv), environ=environ or {}, **kwargs)


def names(args) -> list[tuple[str, ...]]:
    return [spec.names for spec in args.models]


def test_defaults_match_the_documented_ones():
    args = parse()
    assert args.model == DEFAULT_MODEL
    assert [spec.model for spec in args.models] == [DEFAULT_MODEL, DEFAULT_EMBEDDING_MODEL]
    assert names(args) == [(DEFAULT_MODEL,), (DEFAULT_EMBEDDING_MODEL,)]
    assert [spec.convert for spec in args.models] == ["auto", "auto"]
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
        "--convert", "embed",
        "--model", "other-model",
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
    assert [spec.model for spec in args.models] == ["my-model", "other-model"]
    assert [spec.convert for spec in args.models] == ["embed", "auto"]
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


def test_config_file_lists_models_as_names_or_mappings(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "model:\n"
        "  - SmolLM2-135M-Instruct\n"
        "  - model: all-MiniLM-L6-v2\n"
        "    served_model_name: [embed, minilm]\n"
        "    max-model-len: 256\n"
        "  - {model: /models/qwen.gguf, served_model_name: qwen, convert: embed, dtype: float32}\n"
        "served_model_name: [chat]\n"
        "max_model_len: 1K\n"
    )
    args = parse("--config", str(config))
    assert [spec.model for spec in args.models] == [
        DEFAULT_MODEL,
        DEFAULT_EMBEDDING_MODEL,
        "/models/qwen.gguf",
    ]
    assert names(args) == [("chat",), ("embed", "minilm"), ("qwen",)]
    assert [spec.max_model_len for spec in args.models] == [1024, 256, None]
    assert [(spec.convert, spec.dtype) for spec in args.models][2] == ("embed", "float32")

    one = tmp_path / "one.yaml"
    one.write_text("model: {model: m, served_model_name: x}\n")
    assert names(parse("--config", str(one))) == [("x",)]
    # models named on the command line replace the file's, whichever way they are given
    assert [spec.model for spec in parse("--config", str(config), "cli-model").models] == ["cli-model"]
    assert [spec.model for spec in parse("--model", "a", "--config", str(config)).models] == ["a"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("serve.yaml", "model: [[a, b]]\n", "model: give a name, a path or a mapping"),
        ("serve.yaml", "model: [{served_model_name: x}]\n", '"model" (a model name or path) is required'),
        ("serve.yaml", "model: [{model: m, max_len: 5}]\n", "unknown key 'max_len'"),
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
    from engine import EngineConfig

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
    assert defaults == EngineConfig(model=DEFAULT_MODEL, served_model_name=DEFAULT_MODEL, dtype="auto")


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


# ---- several models ----


def test_the_positional_model_comes_first_then_each_model_flag_in_order():
    args = parse("--model", "b", "a", "--model", "c")
    assert [spec.model for spec in args.models] == ["a", "b", "c"]
    assert names(args) == [("a",), ("b",), ("c",)]
    assert args.model == "a"
    only_flags = parse("--model", "x", "--model", "y")
    assert [spec.model for spec in only_flags.models] == ["x", "y"]


def test_json_specs_carry_per_model_settings():
    spec = {
        "model": "/models/llama",
        "served_model_name": ["llama", "default"],
        "convert": "embed",
        "max_model_len": "2k",
        "dtype": "float32",
        "max-num-seqs": 4,
        "max_num_batched_tokens": "1K",
        "kv_cache_memory": "512M",
        "seed": 9,
    }
    args = parse("--model", json.dumps(spec), "--model", '{"model": "m2", "served_model_name": "solo"}')
    first, second = args.models
    assert (first.model, first.names, first.convert, first.dtype) == (
        "/models/llama",
        ("llama", "default"),
        "embed",
        "float32",
    )
    assert (first.max_model_len, first.max_num_seqs, first.max_num_batched_tokens) == (2000, 4, 1024)
    assert (first.kv_cache_memory, first.seed) == (512 * 2**20, 9)
    assert second.names == ("solo",)
    # the positional MODEL takes a JSON spec too
    assert parse('{"model": "p", "served_model_name": "q"}').models[0].names == ("q",)


def test_flags_for_one_model_name_the_first_and_engine_flags_reach_every_model():
    args = parse(
        "first", "--model", "second",
        "--model", '{"model": "third", "dtype": "float16", "max_model_len": 128, "convert": "embed"}',
        "--served-model-name", "one", "uno",
        "--convert", "embed", "--max-model-len", "1k",
        "--dtype", "bfloat16", "--seed", "5", "--max-num-seqs", "3", "--kv-cache-memory", "1G",
    )  # fmt: skip
    assert names(args) == [("one", "uno"), ("second",), ("third",)]
    assert [spec.convert for spec in args.models] == ["embed", "auto", "embed"]
    assert [spec.max_model_len for spec in args.models] == [1000, None, 128]
    assert [spec.dtype for spec in args.models] == ["bfloat16", "bfloat16", "float16"]
    assert {(spec.seed, spec.max_num_seqs, spec.kv_cache_memory) for spec in args.models} == {(5, 3, 2**30)}
    # a spec's own names win over --served-model-name
    assert names(parse('{"model": "m", "served_model_name": "own"}', "--served-model-name", "flag")) == [
        ("own",)
    ]


def test_served_model_name_and_convert_without_a_model_apply_to_the_default_chat_model():
    args = parse("--served-model-name", "chat")
    assert names(args) == [("chat",), (DEFAULT_EMBEDDING_MODEL,)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["m", "--model", "m"], "two models answer to the name 'm': model 1 (m) and model 2 (m)"),
        (
            ["a", "--served-model-name", "x", "y", "--model", '{"model": "b", "served_model_name": ["y"]}'],
            "two models answer to the name 'y': model 1 (a) and model 2 (b)",
        ),
        (["--model", "x", "--model", '{"model": "z", "served_model_name": "x"}'], "the name 'x'"),
    ],
)
def test_duplicate_served_names_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert 'Give each its own names, e.g. --model \'{"model":' in err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('{"model": "m", ', 'argument --model: invalid JSON in model spec {"model": "m", : '),
        ('{"model": "m", "max_len": 5, "tp": 2}', "unknown key 'max_len', 'tp'; a model spec takes model, "),
        ('{"served_model_name": "x"}', '"model" (a model name or path) is required'),
        ('{"model": ""}', '"model" (a model name or path) is required'),
        ('{"model": "m", "served_model_name": []}', '"served_model_name" must be a name or a non-empty list'),
        (
            '{"model": "m", "served_model_name": [1]}',
            '"served_model_name" must be a name or a non-empty list',
        ),
        ('{"model": "m", "convert": "classify"}', "\"convert\" must be one of auto, embed, not 'classify'"),
        ('{"model": "m", "dtype": "int8"}', '"dtype" must be one of auto, float32'),
        ('{"model": "m", "max_model_len": "1.5K"}', '"max_model_len": invalid size'),
        ('{"model": "m", "max_num_seqs": "8"}', '"max_num_seqs" must be an integer'),
        ('{"model": "m", "seed": true}', '"seed" must be an integer'),
        ("", "a model spec cannot be empty"),
    ],
)
def test_bad_model_specs_are_refused_with_a_clear_message(capsys, spec, message):
    with pytest.raises(SystemExit) as exit_info:
        parse("--model", spec)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --model:" in err
    assert message in err


def test_bad_positional_spec_names_the_model_argument(capsys):
    with pytest.raises(SystemExit):
        parse('{"model": "m", "nope": 1}')
    assert (
        'argument MODEL: model spec {"model": "m", "nope": 1}: unknown key \'nope\''
        in capsys.readouterr().err
    )


def test_convert_flag_takes_only_the_known_values(capsys):
    with pytest.raises(SystemExit):
        parse("--convert", "classify")
    assert "argument --convert: invalid choice: 'classify'" in capsys.readouterr().err


def test_serve_help_lists_the_model_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model SPEC" in out and "--convert {auto,embed}" in out


@dataclass
class ContractConfig:
    """The engine config's shape in the engine contract (fields sansllm sets)."""

    model: str
    served_model_name: str | None = None
    convert: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int | None = None
    batch_invariant: bool = False
    keep_quantized: bool = True
    quantized_activations: str = "float"


def test_one_engine_config_per_model():
    args = parse(
        "chat", "--served-model-name", "c", "--max-model-len", "2k", "--dtype", "half", "--batch-invariant",
        "--model", '{"model": "enc", "served_model_name": ["e", "e2"], "convert": "embed", "seed": 4}',
    )  # fmt: skip
    assert engine_configs_from_args(args, ContractConfig) == [
        ContractConfig("chat", "c", dtype="float16", max_model_len=2000, batch_invariant=True),
        ContractConfig("enc", "e", convert="embed", dtype="float16", seed=4, batch_invariant=True),
    ]
    assert engine_config_from_args(args, ContractConfig) == engine_configs_from_args(args, ContractConfig)[0]


def test_gguf_quantization_flags_reach_every_engine():
    args = parse("--model", "a", "--model", "b", "--dequantize", "--quantized-activations", "int8")
    configs = engine_configs_from_args(args, ContractConfig)
    assert [(c.keep_quantized, c.quantized_activations) for c in configs] == [(False, "int8")] * 2
    defaults = engine_configs_from_args(parse("--model", "a"), ContractConfig)
    assert (defaults[0].keep_quantized, defaults[0].quantized_activations) == (True, "float")


class FakeEngine:
    def __init__(self, config: ContractConfig) -> None:
        self.config = config


def test_load_engines_loads_every_model_at_once_and_logs_them(caplog):
    calls = []

    def load(configs):
        calls.append(list(configs))
        return [FakeEngine(config) for config in configs]

    args = parse("--model", "a", "--model", '{"model": "b", "served_model_name": ["bee", "b2"]}')
    with caplog.at_level(logging.INFO, logger="sansllm.assemble"):
        engines = load_engines(args, load=load, config_cls=ContractConfig)
    assert len(calls) == 1  # one call: the engine package puts them all on one thread
    assert [engine.config.model for engine in engines] == ["a", "b"]
    assert "loading model 1 of 2: a (served as 'a')" in caplog.text
    assert "loading model 2 of 2: b (served as 'bee', 'b2')" in caplog.text


def test_a_model_that_fails_to_load_is_named_with_what_to_do():
    def load(configs):
        raise FileNotFoundError("model '/no/such.gguf' not found: give one of SmolLM2-135M-Instruct, ...")

    args = parse("SmolLM2-135M-Instruct", "--model", "/no/such.gguf")
    with pytest.raises(ModelLoadError) as error:
        load_engines(args, load=load, config_cls=ContractConfig)
    message = str(error.value)
    assert message.startswith("could not load model 2 of 2, '/no/such.gguf' (served as '/no/such.gguf'): ")
    assert "FileNotFoundError: model '/no/such.gguf' not found" in message
    assert (
        "Check that '/no/such.gguf' names a packaged model (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)"
        in message
    )
    assert "or leave that model out" in message


def test_a_load_error_that_names_no_model_lists_them_all_and_notes_are_read():
    def vague(configs):
        raise ValueError("max_model_len=2048 exceeds the model's limit of 512 tokens")

    args = parse("--model", "a-model", "--model", "b-model")
    with pytest.raises(
        ModelLoadError, match="could not load one of the models 'a-model', 'b-model': ValueError"
    ):
        load_engines(args, load=vague, config_cls=ContractConfig)

    def noted(configs):
        exc = ValueError("max_model_len=2048 exceeds the model's limit of 512 tokens")
        exc.add_note("while loading model 'b-model'")
        raise exc

    with pytest.raises(ModelLoadError, match="could not load model 2 of 2, 'b-model'"):
        load_engines(args, load=noted, config_cls=ContractConfig)
    with pytest.raises(ModelLoadError, match="could not load model 1 of 1, 'a-model'"):
        load_engines(parse("a-model"), load=vague, config_cls=ContractConfig)


def test_launch_stops_with_the_load_error_before_serving(monkeypatch, caplog):
    import sansllm.launch

    def failing_load(args):
        raise ModelLoadError("could not load model 1 of 1, 'x': boom")

    served = []
    monkeypatch.setattr(sansllm.launch, "load_engines", failing_load)
    monkeypatch.setattr(sansllm.launch, "bind_early", lambda config: ["127.0.0.1:1"])
    with pytest.raises(SystemExit) as exit_info:
        launch(parse("x"), object, lambda app, config: served.append(app))
    assert exit_info.value.code == 1
    assert served == []
    assert "could not load model 1 of 1, 'x': boom" in caplog.text


def test_cors_flags_take_json_lists_as_vllm_does():
    args = parse_serve_args(["--allowed-origins", '["https://a.example"]', "--allow-credentials"], environ={})
    assert args.allowed_origins == ["https://a.example"] and args.allowed_methods == ["*"]
    assert app_config_from_args(args).allow_credentials is True
    with pytest.raises(SystemExit):
        parse_serve_args(["--allowed-origins", "https://a.example"], environ={})


def test_shutdown_timeout_is_how_long_in_flight_requests_may_finish():
    """The drain (the app's) waits --shutdown-timeout; hypercorn then only closes connections."""
    from sansllm.assemble import build_asgi_app
    from tests.runtime.fakes import ScriptedEngine

    assert build_asgi_app(parse("m"), [ScriptedEngine()], object).shutdown_timeout == 30.0
    assert build_asgi_app(parse("m", "--shutdown-timeout", "5"), [ScriptedEngine()], object).shutdown_timeout == 5.0
    assert hypercorn_config_from_args(parse("--shutdown-timeout", "500")).graceful_timeout == 5.0


def test_the_listen_backlog_holds_a_burst_of_clients():
    assert hypercorn_config_from_args(parse()).backlog == 2048  # hypercorn's 100 drops connections at 256


def test_media_flags_reach_the_core_and_the_fetcher(tmp_path):
    args = parse(
        "--limit-mm-per-prompt", '{"image": 2, "video": 0}',
        "--allowed-media-domains", "images.example", "cdn.example",
        "--allowed-local-media-path", str(tmp_path),
        "--max-media-bytes", "1M",
        environ={"VLLM_IMAGE_FETCH_TIMEOUT": "2.5"},
    )  # fmt: skip
    assert app_config_from_args(args).limit_mm_per_prompt == {"image": 2, "video": 0}
    limits = args.fetch_limits
    assert limits.allowed_domains == frozenset({"images.example", "cdn.example"})
    assert limits.allowed_local_path == tmp_path
    assert (limits.max_bytes, limits.image_timeout, limits.audio_timeout) == (1 << 20, 2.5, 10.0)  # 1M: MiB
    defaults = parse().fetch_limits
    assert (defaults.allowed_domains, defaults.allowed_local_path) == (None, None)  # any host; no file://


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--limit-mm-per-prompt", '{"img": 1}'], {}, "unknown modality 'img'"),
        (["--limit-mm-per-prompt", '{"image": -1}'], {}, "must be a whole number >= 0"),
        (["--limit-mm-per-prompt", "[1]"], {}, "--limit-mm-per-prompt"),
        ([], {"VLLM_VIDEO_FETCH_TIMEOUT": "soon"}, "VLLM_VIDEO_FETCH_TIMEOUT='soon' is not a number of seconds"),
    ],
)
def test_bad_media_settings_are_refused_at_start(capsys, argv, environ, message):
    with pytest.raises(SystemExit):
        parse(*argv, environ=environ)
    assert message in capsys.readouterr().err


def test_audio_upload_flags_reach_the_core_and_lift_the_body_cap():
    config = app_config_from_args(parse("--max-audio-upload-bytes", "100M", "--max-audio-upload-seconds", "90"))
    assert (config.max_audio_upload_bytes, config.max_audio_upload_seconds) == (100 << 20, 90.0)
    assert config.max_request_body_bytes > 100 << 20  # the upload and its form fields get through
    defaults = app_config_from_args(parse())
    assert (defaults.max_audio_upload_bytes, defaults.max_audio_upload_seconds) == (25 << 20, 3600.0)
