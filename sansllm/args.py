"""The `sansllm serve` command line (shared by `python -m runtime_asyncio` / `python -m runtime_trio`).

Flags follow vLLM's `vllm serve` where they overlap. `--config file.yaml` holds a flat mapping of
flag names to values; flags given on the command line win over the file whatever their order.

One process serves several models: the positional MODEL, then each `--model SPEC` in order (none
given: both packaged models). A SPEC is a name or path, or a JSON object with the model's own
settings (`ModelSpec`). The flags that describe one model (`--served-model-name`, `--convert`,
`--max-model-len`) apply to the first model, as in vLLM; the engine settings (`--dtype`, `--seed`,
`--max-num-seqs`, ...) apply to every model; a spec's own keys win over both. After parsing,
`args.models` holds every model with its effective settings and `args.model` the first one's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from protocol.app import DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADER_COUNT
from sansllm.media_fetch import FetchLimits
from sansllm.parser_plugins import check_parser_args

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # the packaged generative model
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"  # the packaged embedding model
DEFAULT_MODELS = (DEFAULT_MODEL, DEFAULT_EMBEDDING_MODEL)  # served when no model is named
DTYPES = ("auto", "float32", "float", "float16", "half", "bfloat16")
CONVERTS = ("auto", "embed")
RUNTIMES = ("asyncio", "trio")
API_KEY_ENV_VARS = ("SANSLLM_API_KEY", "VLLM_API_KEY")
_NEGATABLE_FLAGS = frozenset({"http2"})  # booleans with a --no- form: `false` in a config file means --no-X
# CORS flags take one JSON list (vLLM's form); a config file's YAML list is passed as that JSON
_CORS_LIST_FLAGS = {"allowed-origins": "origins", "allowed-methods": "methods", "allowed-headers": "headers"}

_DECIMAL_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def json_object(value: str) -> dict[str, Any]:
    """A flag whose value is a JSON object (`--speculative-config`); the engine checks its keys."""
    try:
        mapping = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON {value!r}: {exc.msg} (column {exc.colno})") from None
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError(f"{value!r} is not a JSON object")
    return mapping


@dataclass(frozen=True)
class LoRAModule:
    """One `--lora-modules` entry: an adapter folder served as `name` over `base_model_name`."""

    name: str
    path: str
    base_model_name: str | None = None


def lora_module(value: str) -> LoRAModule:
    """`name=path`, or vLLM's JSON form `{"name": ..., "path": ..., "base_model_name": ...}`."""
    if value.lstrip().startswith("{"):
        spec = json_object(value)
        if not isinstance(spec.get("name"), str) or not isinstance(spec.get("path"), str):
            raise argparse.ArgumentTypeError(f"{value!r}: a LoRA module needs a string name and path")
        base = spec.get("base_model_name")
        return LoRAModule(spec["name"], spec["path"], str(base) if base else None)
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: give a LoRA module as name=path or as a JSON object")
    return LoRAModule(name, path)


MODALITIES = ("image", "audio", "video")


def media_limits(value: str) -> dict[str, int]:
    """vLLM's `--limit-mm-per-prompt`: a JSON object of modality -> most items in one prompt."""
    limits = json_object(value)
    for key, limit in limits.items():
        if key not in MODALITIES:
            raise argparse.ArgumentTypeError(f"unknown modality {key!r}: use {', '.join(MODALITIES)}")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise argparse.ArgumentTypeError(f"the limit for {key} must be a whole number >= 0, got {limit!r}")
    return limits


def fetch_limits_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> FetchLimits:
    """The media fetcher's limits: the flags, over vLLM's VLLM_*_FETCH_TIMEOUT variables (a bad
    value is a ValueError naming the variable)."""
    overrides: dict[str, Any] = {}
    if getattr(args, "allowed_media_domains", None) is not None:
        overrides["allowed_domains"] = frozenset(args.allowed_media_domains)
    if getattr(args, "allowed_local_media_path", None):
        overrides["allowed_local_path"] = Path(args.allowed_local_media_path)
    if getattr(args, "max_media_bytes", None) is not None:
        overrides["max_bytes"] = args.max_media_bytes
    return FetchLimits.from_env(environ, **overrides)


def json_string_list(value: str) -> list[str]:
    """A JSON list of strings, as vLLM's CORS flags take them (`'["https://a.example"]'`)."""
    try:
        parsed = json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a JSON list: {value!r}") from None
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return parsed


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


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: what to load, and the settings that are its own.

    As parsed from a SPEC, None means "not given". In `args.models` (after `resolve_models`) every
    field is the model's effective setting (None: the engine's default) and `served_model_name`
    holds its names.
    """

    model: str  # a packaged model name, a .gguf file or an HF folder
    served_model_name: tuple[str, ...] | None = None  # the first is reported; any is accepted
    convert: str | None = None  # "embed": a decoder model served as an embedding model
    dtype: str | None = None
    max_model_len: int | None = None
    seed: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_step_ratio: float | None = None
    kv_cache_memory: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The names the API knows the model by: its served names, else its spec's name or path."""
        return self.served_model_name or (self.model,)


SPEC_KEYS = tuple(field.name for field in fields(ModelSpec))
_SIZE_KEYS = frozenset({"max_model_len", "max_num_batched_tokens", "kv_cache_memory"})
_INT_KEYS = frozenset({"seed", "max_num_seqs"})
_FLOAT_KEYS = frozenset({"max_step_ratio"})
_CHOICES = {"convert": CONVERTS, "dtype": DTYPES}
_MODEL_DESTS = frozenset({"model_tag", "model_specs"})  # the command line's models replace the file's


def parse_model_spec(text: str) -> ModelSpec:
    """A SPEC: a model name or path, or a JSON object `{"model": ..., <per-model keys>}`."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a model spec cannot be empty: give a name, a path or a JSON object")
    if not text.lstrip().startswith("{"):
        return ModelSpec(text)
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"invalid JSON in model spec {text}: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    return model_spec_from_mapping(mapping, text)  # JSON text starting with "{" is an object


def model_spec_from_mapping(mapping: Mapping[Any, Any], shown: str) -> ModelSpec:
    """Check a spec's mapping (keys with dashes or underscores); errors quote it as `shown`."""

    def refuse(problem: str) -> argparse.ArgumentTypeError:
        return argparse.ArgumentTypeError(f"model spec {shown}: {problem}")

    values = {str(key).replace("-", "_"): value for key, value in mapping.items()}
    unknown = [key for key in values if key not in SPEC_KEYS]
    if unknown:
        listed = ", ".join(repr(key) for key in unknown)
        raise refuse(f"unknown key {listed}; a model spec takes {', '.join(SPEC_KEYS)}")
    model = values.get("model")
    if not isinstance(model, str) or not model.strip():
        raise refuse('"model" (a model name or path) is required')
    settings: dict[str, Any] = {"model": model}
    for key, value in values.items():
        if key == "model" or value is None:
            continue
        if key == "served_model_name":
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
                raise refuse('"served_model_name" must be a name or a non-empty list of names')
            settings[key] = tuple(names)
        elif key in _CHOICES:
            if value not in _CHOICES[key]:
                raise refuse(f'"{key}" must be one of {", ".join(_CHOICES[key])}, not {value!r}')
            settings[key] = value
        elif key in _SIZE_KEYS and isinstance(value, str):
            try:
                settings[key] = human_readable_int(value)
            except argparse.ArgumentTypeError as exc:
                raise refuse(f'"{key}": {exc}') from None
        elif key in _SIZE_KEYS | _INT_KEYS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise refuse(f'"{key}" must be an integer, not {value!r}')
            settings[key] = value
        elif key in _FLOAT_KEYS:
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise refuse(f'"{key}" must be a number of at least 0, not {value!r}')
            settings[key] = float(value)
    return ModelSpec(**settings)


def resolve_models(args: argparse.Namespace) -> list[ModelSpec]:
    """Every model to serve, with its effective settings (see the module docstring for the rules).

    Raises ValueError when two models would answer to the same name.
    """
    given = ([args.model_tag] if args.model_tag is not None else []) + list(args.model_specs or [])
    specs = given or [ModelSpec(model) for model in DEFAULT_MODELS]
    models = []
    for index, spec in enumerate(specs):
        first = index == 0
        first_only = {
            "served_model_name": tuple(args.served_model_name) if first and args.served_model_name else None,
            "convert": args.convert if first else "auto",
            "max_model_len": args.max_model_len if first else None,
        }
        every = {
            "dtype": args.dtype,
            "seed": args.seed,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_step_ratio": args.max_step_ratio,
            "kv_cache_memory": args.kv_cache_memory,
        }
        merged = {
            key: getattr(spec, key) if getattr(spec, key) is not None else value
            for key, value in (first_only | every).items()
        }
        resolved = replace(spec, **merged)
        models.append(replace(resolved, served_model_name=resolved.names))
    _check_unique_names(models)
    return models


def _check_unique_names(models: Sequence[ModelSpec]) -> None:
    owners: dict[str, int] = {}
    for index, spec in enumerate(models):
        for name in spec.names:
            other = owners.setdefault(name, index)
            if other != index:
                example = json.dumps({"model": spec.model, "served_model_name": f"{name}-{index + 1}"})
                raise ValueError(
                    f"two models answer to the name {name!r}: model {other + 1} ({models[other].model}) "
                    f"and model {index + 1} ({spec.model}). Give each its own names, e.g. --model '{example}'"
                )


def add_serve_arguments(parser: argparse.ArgumentParser, *, runtime_flag: bool = True) -> None:
    """Add the flags of `sansllm serve` to `parser` (without --runtime when the runtime is fixed)."""
    parser.add_argument(
        "model_tag",
        metavar="MODEL",
        nargs="?",
        type=parse_model_spec,
        help="the first model to serve: a name or path, or a JSON spec as for --model",
    )
    parser.add_argument(
        "--model",
        dest="model_specs",
        metavar="SPEC",
        action="append",
        type=parse_model_spec,
        help="another model to serve (repeatable): a name or path, or a JSON object such as "
        '\'{"model": "all-MiniLM-L6-v2", "served_model_name": ["embed"], "max_model_len": 512}\' '
        f"with keys {', '.join(SPEC_KEYS)}. No model at all: serve {' and '.join(DEFAULT_MODELS)}",
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
    net.add_argument(
        "--h11-max-header-count",
        type=int,
        default=DEFAULT_MAX_HEADER_COUNT,
        help="a request with more header fields gets a 431 (HTTP/1.1 and HTTP/2; vLLM's flag and default)",
    )
    net.add_argument(
        "--h11-max-incomplete-event-size",
        type=human_readable_int,
        default=DEFAULT_MAX_HEADER_BYTES,
        help="bytes of header fields a request may carry, as HTTP/1.1 writes them, before it gets a 431 "
        "(HTTP/2 too; vLLM's flag and default, 4 MiB); past twice that hypercorn itself refuses the "
        "request (HTTP/1.1: an empty 431; HTTP/2: the connection is closed)",
    )

    api = parser.add_argument_group("API")
    api.add_argument(
        "--api-key", nargs="+", help=f"bearer keys required on every path but /health, /ping, /version and /metrics (default: ${API_KEY_ENV_VARS[0]})"
    )
    api.add_argument(
        "--served-model-name",
        nargs="+",
        help="the first model's names in the API (the first is reported); default: its spec",
    )
    api.add_argument("--chat-template", help="jinja2 chat template: a file path or the template itself")
    api.add_argument("--chat-template-content-format", choices=("auto", "string", "openai"), default="auto")
    api.add_argument("--trust-request-chat-template", action="store_true")
    api.add_argument("--response-role", default="assistant")
    api.add_argument("--max-logprobs", type=int, default=20)
    api.add_argument("--enable-prompt-tokens-details", action="store_true")
    api.add_argument("--enable-force-include-usage", action="store_true")
    api.add_argument("--return-tokens-as-token-ids", action="store_true")
    api.add_argument("--enable-request-id-headers", action="store_true")
    api.add_argument(
        "--enable-server-load-tracking",
        action="store_true",
        help="GET /load reports the requests in flight (vLLM's; 0 without this flag)",
    )
    api.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info: the tokenizer's configuration (tokenizer_config.json, "
        "tokenizer_class, chat template); off by default, as in vLLM, since it shows the chat template",
    )
    api.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM/SIGINT (while /health answers 503 and "
        "new requests are refused); streams still running then end with an SSE error frame",
    )
    api.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="log each request's id, prompt token ids and sampling parameters as it reaches the engine",
    )
    api.add_argument(
        "--max-log-len", type=int, help="prompt token ids logged per request at most (default: all)"
    )
    for flag, what in _CORS_LIST_FLAGS.items():
        api.add_argument(f"--{flag}", type=json_string_list, default=["*"], help=f'CORS: allowed {what}, a JSON list (default ["*"])')
    api.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    api.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='parse tool calls from the output when tool_choice is "auto" (needs --tool-call-parser)',
    )
    api.add_argument(
        "--exclude-tools-when-tool-choice-none",
        action="store_true",
        help='leave `tools` out of the chat template when tool_choice is "none" (small models otherwise '
        "keep calling a tool that is listed)",
    )
    api.add_argument(
        "--tool-call-parser",
        help="the model's tool-call format: hermes (Hermes, Qwen 2.5), mistral, llama3_json, pythonic, "
        "or a name registered by --tool-parser-plugin",
    )
    api.add_argument(
        "--tool-parser-plugin", help="a Python file that registers a tool parser (register_tool_parser)"
    )
    api.add_argument(
        "--reasoning-parser",
        help="split <think>...</think> reasoning into `reasoning`: deepseek_r1, qwen3, or a plugin's name",
    )
    api.add_argument(
        "--reasoning-parser-plugin",
        help="a Python file that registers a reasoning parser (register_reasoning_parser)",
    )

    eng = parser.add_argument_group("engine")
    eng.add_argument(
        "--max-model-len", type=human_readable_int, help="the first model's context length, e.g. 2048, 2k, 2K"
    )
    eng.add_argument(
        "--convert",
        choices=CONVERTS,
        default="auto",
        help="embed: serve the first model (a decoder) as an embedding model, pooling its last token",
    )
    eng.add_argument("--dtype", choices=DTYPES, default="auto", help="every model's dtype")
    eng.add_argument("--seed", type=int)
    eng.add_argument("--max-num-seqs", type=int)
    eng.add_argument("--max-num-batched-tokens", type=human_readable_int)
    eng.add_argument(
        "--max-step-ratio",
        type=float,
        help="while sequences decode, a step that also prefills prompts may take at most this many "
        "times a decode step at the present load, so streams do not stall while prompts arrive "
        "(default 2.5; 0: off, only --max-num-batched-tokens limits a step)",
    )
    eng.add_argument(
        "--max-num-queued-requests",
        type=int,
        help="refuse a request at once with a 503 and Retry-After while this many sequences wait to be "
        "scheduled (per model; default: no limit)",
    )
    eng.add_argument(
        "--max-num-queued-tokens",
        type=human_readable_int,
        help="the same, for prompt tokens waiting to be scheduled (e.g. 64k)",
    )
    eng.add_argument(
        "--max-queue-time",
        type=float,
        help="seconds a request may wait to be scheduled before it fails with a 503 (default: no limit)",
    )
    eng.add_argument("--kv-cache-memory", type=human_readable_int, help="KV cache size in bytes, e.g. 2G")
    eng.add_argument(
        "--speculative-config",
        type=json_object,
        help="speculative decoding with n-gram proposals (prompt lookup), as vLLM's: "
        '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
        "(and max_decoding_seqs, default 4: draft only while at most that many sequences decode)",
    )
    eng.add_argument(
        "--batch-invariant", action="store_true", help="results independent of batch composition"
    )
    eng.add_argument(
        "--dequantize",
        action="store_true",
        help="dequantize GGUF weights at load (to --dtype) instead of running on their quantized "
        "blocks: slower and several times the memory, for exactness checks",
    )
    eng.add_argument(
        "--quantized-activations",
        choices=("float", "int8"),
        default="float",
        help="activations of the matmuls on quantized GGUF weights for few rows: float (exact up to "
        "float32 rounding) or int8 per block of 32, as llama.cpp does (faster on CPUs with VNNI; "
        "greedy output then parts from the float model's)",
    )

    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters over the generative models")
    lora.add_argument(
        "--lora-modules",
        nargs="+",
        type=lora_module,
        default=[],
        metavar="NAME=PATH",
        help="PEFT adapter folders to serve, as name=path or JSON "
        '{"name": ..., "path": ..., "base_model_name": ...} (default base: the first model)',
    )
    lora.add_argument(
        "--max-loras", type=int, default=1, help="adapters one step can run (their requests batch together)"
    )
    lora.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank accepted")
    lora.add_argument(
        "--max-cpu-loras", type=int, help="adapters kept in memory (default: --max-loras); others are read again"
    )
    lora.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also set by "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true, as vLLM)",
    )

    media = parser.add_argument_group("Media in prompts")
    media.add_argument(
        "--limit-mm-per-prompt",
        type=media_limits,
        default={},
        metavar="JSON",
        help='most media items of each kind in one prompt, e.g. \'{"image": 4, "video": 0}\' (default 999 each)',
    )
    media.add_argument(
        "--enable-mm-embeds",
        action="store_true",
        help="accept image_embeds content parts (base64 torch.save tensors of the model's input embeddings)",
    )
    media.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=None,
        metavar="HOST",
        help="fetch http(s) media URLs only from these hostnames, redirects included (default: any)",
    )
    media.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="serve file:// media URLs from inside this folder (default: file:// URLs are refused)",
    )
    media.add_argument(
        "--max-media-bytes",
        type=human_readable_int,
        default=None,
        metavar="SIZE",
        help="largest media item fetched from a URL, e.g. 20M (default 64 MiB); fetch time limits come "
        "from VLLM_IMAGE_FETCH_TIMEOUT (5 s), VLLM_AUDIO_FETCH_TIMEOUT (10 s), VLLM_VIDEO_FETCH_TIMEOUT (30 s)",
    )

    speech = parser.add_argument_group("Speech to text")
    speech.add_argument(
        "--max-audio-upload-bytes",
        type=human_readable_int,
        default=None,
        metavar="SIZE",
        help="largest audio file /v1/audio/transcriptions and /translations take, e.g. 25M (default 25 MiB; over it: 413)",
    )
    speech.add_argument(
        "--max-audio-upload-seconds",
        type=float,
        default=None,
        metavar="SECONDS",
        help="longest decoded audio taken (default 3600; over it: 400)",
    )

    ray = parser.add_argument_group("Ray Serve (the ray extra; see sansllm.serve_ray)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve: engine replicas behind an ingress with prefix-cache-aware routing, "
        "on the cluster $RAY_ADDRESS names or a local one; --host/--port are Ray's HTTP proxy's",
    )
    ray.add_argument("--ray-replicas", type=int, default=1, metavar="N", help="engine replicas (with --ray)")
    ray.add_argument(
        "--ray-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sansllm.serve_ray option (repeatable), e.g. num_cpus=2, min_replicas=1, routing=pow2",
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
    if environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true", "yes"):
        args.allow_runtime_lora_updating = True
    if args.lora_modules and not args.enable_lora:
        parser.error("--lora-modules needs --enable-lora")
    if args.ssl_keyfile and not args.ssl_certfile:
        parser.error("--ssl-keyfile needs --ssl-certfile")
    for flag in ("h11_max_header_count", "h11_max_incomplete_event_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    try:
        args.models = resolve_models(args)
        check_parser_args(args)
        check_lora_bases(args)
        args.fetch_limits = fetch_limits_from_args(args, environ)
    except ValueError as exc:
        parser.error(str(exc))
    args.model = args.models[0].model
    return args


def check_lora_bases(args: argparse.Namespace) -> None:
    """Each `--lora-modules` entry's base model is served (ValueError naming it otherwise)."""
    names = {name for spec in args.models for name in spec.names}
    for module in args.lora_modules:
        if module.base_model_name is not None and module.base_model_name not in names:
            raise ValueError(
                f"LoRA module {module.name!r}: its base model {module.base_model_name!r} is not served "
                f"(served: {', '.join(sorted(names))})"
            )


def lora_modules_for(spec: ModelSpec, args: argparse.Namespace) -> dict[str, str]:
    """The adapters `--lora-modules` puts on model `spec` (those without a base go on the first model)."""
    first = spec is args.models[0]
    return {
        module.name: module.path
        for module in args.lora_modules
        if (module.base_model_name in spec.names) or (module.base_model_name is None and first)
    }


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
    """Turn a config mapping into command-line tokens (true -> --flag, list -> --flag a b).

    `model` may be one model or a list; each a name or path, or a mapping of per-model settings.
    """
    tokens: list[str] = []
    for key, value in mapping.items():
        if key == "model":
            items = value if isinstance(value, list) else [] if value is None else [value]
            tokens += [f"--model={_config_model_spec(item)}" for item in items]
        elif key == "config":
            raise ValueError("a config file cannot name another config file")
        elif isinstance(value, bool):
            if value:
                tokens.append(f"--{key}")
            elif key in _NEGATABLE_FLAGS:
                tokens.append(f"--no-{key}")
        elif isinstance(value, list) and key in _CORS_LIST_FLAGS:
            tokens += [f"--{key}", json.dumps(value)]
        elif isinstance(value, list):  # mappings in it as JSON (--lora-modules' JSON form)
            tokens += [f"--{key}", *(json.dumps(item) if isinstance(item, dict) else str(item) for item in value)]
        elif isinstance(value, dict):  # a JSON-valued flag (--speculative-config)
            tokens += [f"--{key}", json.dumps(value)]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def _config_model_spec(item: Any) -> str:
    if isinstance(item, dict):
        return json.dumps(item, default=str)
    if isinstance(item, list):
        raise ValueError("model: give a name, a path or a mapping of model settings, or a list of those")
    return str(item)


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
    if given_on_command_line & _MODEL_DESTS:  # models named on the command line replace the file's
        given_on_command_line |= _MODEL_DESTS
    for dest in _explicit_dests(tokens, runtime_flag) - given_on_command_line:
        setattr(args, dest, getattr(from_file, dest))


def _explicit_dests(argv: list[str] | None, runtime_flag: bool) -> set[str]:
    """The destinations `argv` sets explicitly: parse again with every default suppressed."""
    quiet = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(quiet, runtime_flag=runtime_flag)
    for action in quiet._actions:  # argparse has no public way to suppress every default
        action.default = argparse.SUPPRESS
        if action.type is parse_model_spec:  # argparse would convert an absent MODEL's default
            action.type = None
    return set(vars(quiet.parse_args(argv)))
