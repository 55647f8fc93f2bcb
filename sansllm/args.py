"""The `sansllm serve` command line (shared by `python -m runtime_asyncio` / `python -m runtime_trio`).

Flags follow vLLM's `vllm serve` where they overlap. `--config file.yaml` holds a flat mapping of
flag names to values; flags given on the command line win over the file whatever their order.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
RUNTIMES = ("asyncio", "trio")
API_KEY_ENV_VARS = ("SANSLLM_API_KEY", "VLLM_API_KEY")
_NEGATABLE_FLAGS = frozenset({"http2"})  # booleans with a --no- form: `false` in a config file means --no-X

_DECIMAL_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_readable_int(value: str) -> int:
    """`1k` = 1000, `1K` = 1024, `25.6k` = 25600 (vLLM's rule: no decimals with binary suffixes)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value.strip())
    if match is None:
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid size {value!r}: use an integer or e.g. 1k, 1K, 25.6k"
            ) from None
    number, suffix = match.groups()
    if suffix in _BINARY_SUFFIXES:
        if "." in number:
            raise argparse.ArgumentTypeError(
                f"invalid size {value!r}: decimals are not allowed with binary suffixes like K, M, G"
            )
        return int(number) * _BINARY_SUFFIXES[suffix]
    exact = Decimal(number) * _DECIMAL_SUFFIXES[suffix]
    if exact != exact.to_integral_value():
        raise argparse.ArgumentTypeError(f"invalid size {value!r}: it is not a whole number")
    return int(exact)


def add_serve_arguments(parser: argparse.ArgumentParser, *, runtime_flag: bool = True) -> None:
    """Add the flags of `sansllm serve` to `parser` (without --runtime when the runtime is fixed)."""
    parser.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help="model name or path (default: %(default)s)"
    )
    parser.add_argument("--config", help="YAML file with a flat mapping of flag names to values")
    if runtime_flag:
        parser.add_argument(
            "--runtime", choices=RUNTIMES, default="asyncio", help="async library to serve on"
        )

    net = parser.add_argument_group("network and TLS")
    net.add_argument("--host", default="127.0.0.1")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--uds", help="serve on this Unix domain socket instead of host:port")
    net.add_argument("--ssl-certfile", "--certfile", dest="ssl_certfile", help="PEM certificate: serve HTTPS")
    net.add_argument(
        "--ssl-keyfile", "--keyfile", dest="ssl_keyfile", help="PEM key (default: in the certfile)"
    )
    net.add_argument("--ssl-ca-certs", help="CA certificates to verify clients against")
    net.add_argument(
        "--http2",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer h2 by ALPN over TLS (h2c with prior knowledge works regardless)",
    )
    net.add_argument("--root-path", default="", help="path prefix when behind a proxy")

    api = parser.add_argument_group("API")
    api.add_argument(
        "--api-key", nargs="+", help=f"required bearer keys for /v1 (default: ${API_KEY_ENV_VARS[0]})"
    )
    api.add_argument("--served-model-name", nargs="+", help="names the API accepts (the first is reported)")
    api.add_argument("--chat-template", help="jinja2 chat template: a file path or the template itself")
    api.add_argument("--chat-template-content-format", choices=("auto", "string", "openai"), default="auto")
    api.add_argument("--trust-request-chat-template", action="store_true")
    api.add_argument("--response-role", default="assistant")
    api.add_argument("--max-logprobs", type=int, default=20)
    api.add_argument("--enable-prompt-tokens-details", action="store_true")
    api.add_argument("--enable-force-include-usage", action="store_true")
    api.add_argument("--return-tokens-as-token-ids", action="store_true")
    api.add_argument("--enable-request-id-headers", action="store_true")

    eng = parser.add_argument_group("engine")
    eng.add_argument("--max-model-len", type=human_readable_int, help="context length, e.g. 2048, 2k, 2K")
    eng.add_argument(
        "--dtype", choices=("auto", "float32", "float", "float16", "half", "bfloat16"), default="auto"
    )
    eng.add_argument("--seed", type=int)
    eng.add_argument("--max-num-seqs", type=int)
    eng.add_argument("--max-num-batched-tokens", type=human_readable_int)
    eng.add_argument("--kv-cache-memory", type=human_readable_int, help="KV cache size in bytes, e.g. 2G")
    eng.add_argument(
        "--batch-invariant", action="store_true", help="results independent of batch composition"
    )

    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error", "critical"),
        default="info",
        type=str.lower,
    )


def build_serve_parser(prog: str | None = None, *, runtime_flag: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Serve a model over the OpenAI-compatible API.")
    add_serve_arguments(parser, runtime_flag=runtime_flag)
    return parser


def parse_serve_args(
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    runtime: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """Parse `serve` flags, merge `--config`, and fill the API keys from the environment.

    `runtime` fixes the runtime (the `python -m runtime_*` entry points) and drops `--runtime`.
    """
    parser = build_serve_parser(prog, runtime_flag=runtime is None)
    argv = list(argv) if argv is not None else None
    args = parser.parse_args(argv)
    if args.config:
        _merge_config_file(parser, argv, args, runtime_flag=runtime is None)
    if runtime is not None:
        args.runtime = runtime
    environ = os.environ if environ is None else environ
    if not args.api_key:
        args.api_key = next(([environ[name]] for name in API_KEY_ENV_VARS if environ.get(name)), [])
    if args.ssl_keyfile and not args.ssl_certfile:
        parser.error("--ssl-keyfile needs --ssl-certfile")
    return args


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML file holding a flat mapping of flag names (dashes or underscores) to values."""
    if Path(path).suffix not in (".yaml", ".yml"):
        raise ValueError(f"config file {path!r} must be a .yaml or .yml file")
    with open(path, encoding="utf-8") as file:
        mapping = yaml.safe_load(file) or {}
    if not isinstance(mapping, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of flag names to values")
    return {str(key).replace("_", "-"): value for key, value in mapping.items()}


def config_tokens(mapping: Mapping[str, Any]) -> list[str]:
    """Turn a config mapping into command-line tokens (true -> --flag, list -> --flag a b)."""
    tokens: list[str] = []
    for key, value in mapping.items():
        if key == "model":
            tokens.insert(0, str(value))
        elif key == "config":
            raise ValueError("a config file cannot name another config file")
        elif isinstance(value, bool):
            if value:
                tokens.append(f"--{key}")
            elif key in _NEGATABLE_FLAGS:
                tokens.append(f"--no-{key}")
        elif isinstance(value, list):
            tokens += [f"--{key}", *map(str, value)]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def _merge_config_file(
    parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace, *, runtime_flag: bool
) -> None:
    """Set every flag the config file gives and the command line does not."""
    try:
        tokens = config_tokens(load_config_file(args.config))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        parser.error(f"--config: {exc}")
    from_file = parser.parse_args(tokens)
    given_on_command_line = _explicit_dests(argv, runtime_flag)
    for dest in _explicit_dests(tokens, runtime_flag) - given_on_command_line:
        setattr(args, dest, getattr(from_file, dest))


def _explicit_dests(argv: list[str] | None, runtime_flag: bool) -> set[str]:
    """The destinations `argv` sets explicitly: parse again with every default suppressed."""
    quiet = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(quiet, runtime_flag=runtime_flag)
    for action in quiet._actions:  # argparse has no public way to suppress every default
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))
