"""Build the server from parsed `serve` flags: engines, served models, the core `App`, the ASGI shell.

Every model in `args.models` gets an engine (all of them on one engine thread when the engine
package offers `load_engines`) and a `ServedModel`, in the same order.

Runtime-neutral: the caller passes the bridge factory of its runtime (or one that picks the
runtime at startup), so this module imports neither asyncio nor trio.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec

from protocol.app import App, AppConfig
from protocol.asgi import AsgiApp
from protocol.model import PoolingInfo, ServedModel
from sansllm.args import DEFAULT_MODELS, ModelSpec, fetch_limits_from_args, lora_modules_for
from sansllm.chat_template import load_chat_template
from sansllm.lifecycle import BridgeFactory, EngineLifecycle
from sansllm.media_fetch import MediaFetcher
from sansllm.metrics import ServerMetrics

logger = logging.getLogger(__name__)

_DTYPE_ALIASES = {"float": "float32", "half": "float16"}


class ModelLoadError(RuntimeError):
    """A model could not be loaded: the message says which spec failed and what to do."""


def engine_configs_from_args(args: argparse.Namespace, config_cls: Callable[..., Any]) -> list[Any]:
    """One engine config per served model, in `args.models` order."""
    return [engine_config_for(spec, args, config_cls) for spec in args.models]


def engine_config_from_args(args: argparse.Namespace, config_cls: Callable[..., Any]) -> Any:
    """The first model's engine config."""
    return engine_config_for(args.models[0], args, config_cls)


def engine_config_for(spec: ModelSpec, args: argparse.Namespace, config_cls: Callable[..., Any]) -> Any:
    """The engine's config for one model; settings its config does not know (yet) are logged and dropped."""
    wanted = {
        "model": spec.model,
        "served_model_name": spec.names[0],
        "convert": spec.convert if spec.convert != "auto" else None,
        "dtype": _DTYPE_ALIASES.get(spec.dtype, spec.dtype),
        "max_model_len": spec.max_model_len,
        "seed": spec.seed,
        "max_num_seqs": spec.max_num_seqs,
        "max_num_batched_tokens": spec.max_num_batched_tokens,
        "max_step_ratio": spec.max_step_ratio,
        "kv_cache_memory": spec.kv_cache_memory,
        "batch_invariant": args.batch_invariant or None,  # process-wide
        "keep_quantized": False if getattr(args, "dequantize", False) else None,
        "quantized_activations": getattr(args, "quantized_activations", None),
        "speculative_config": getattr(args, "speculative_config", None),  # process-wide
        "max_num_queued_requests": getattr(args, "max_num_queued_requests", None),  # per model, same limit
        "max_num_queued_tokens": getattr(args, "max_num_queued_tokens", None),
        "max_queue_seconds": getattr(args, "max_queue_time", None),
    }
    if getattr(args, "enable_lora", False):
        wanted |= {
            "enable_lora": True,
            "max_loras": args.max_loras,
            "max_lora_rank": args.max_lora_rank,
            "max_cpu_loras": args.max_cpu_loras,
            "lora_modules": lora_modules_for(spec, args),
        }
    return _construct(config_cls, {key: value for key, value in wanted.items() if value is not None})


def app_config_from_args(args: argparse.Namespace) -> AppConfig:
    """The core's options from the flags (the chat template file is read here: the core does no IO)."""
    config = _app_config(args)
    # an audio upload as large as --max-audio-upload-bytes must get through the body cap (+ its form)
    floor = config.max_audio_upload_bytes + (1 << 20)
    if config.max_request_body_bytes < floor:
        config = msgspec.structs.replace(config, max_request_body_bytes=floor)
    return config


def _app_config(args: argparse.Namespace) -> AppConfig:
    return AppConfig(
        api_keys=list(args.api_key),
        max_logprobs=args.max_logprobs,
        response_role=args.response_role,
        chat_template=load_chat_template(args.chat_template),
        chat_template_content_format=args.chat_template_content_format,
        trust_request_chat_template=args.trust_request_chat_template,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        enable_force_include_usage=args.enable_force_include_usage,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_request_id_headers=args.enable_request_id_headers,
        enable_server_load_tracking=args.enable_server_load_tracking,
        allow_runtime_lora_updating=getattr(args, "allow_runtime_lora_updating", False),
        enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        max_header_count=args.h11_max_header_count,
        max_header_bytes=args.h11_max_incomplete_event_size,
        root_path=args.root_path,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        limit_mm_per_prompt=dict(getattr(args, "limit_mm_per_prompt", None) or {}),
        enable_mm_embeds=bool(getattr(args, "enable_mm_embeds", False)),
        **_set(
            max_audio_upload_bytes=getattr(args, "max_audio_upload_bytes", None),
            max_audio_upload_seconds=getattr(args, "max_audio_upload_seconds", None),
        ),
        version=_version(),
    )


def _set(**values: Any) -> dict[str, Any]:
    """The flags given (not None): the others keep AppConfig's defaults."""
    return {key: value for key, value in values.items() if value is not None}


def load_engines(
    args: argparse.Namespace,
    *,
    load: Callable[[Sequence[Any]], Sequence[Any]] | None = None,
    config_cls: Callable[..., Any] | None = None,
) -> list[Any]:
    """Load every model named by the flags (slow: the weights are read here), in `args.models` order.

    By default with the engine package's `load_engines`, which runs them all on one engine thread
    (`load` and `config_cls` replace it and `EngineConfig` in tests). Raises `ModelLoadError`
    naming the spec that failed.
    """
    if load is None or config_cls is None:
        import engine  # torch is imported only when a model is served

        load, config_cls = load or engine.load_engines, config_cls or engine.EngineConfig
    try:
        configs = engine_configs_from_args(args, config_cls)
    except ValueError as exc:  # a setting the engine's config refuses (e.g. --speculative-config)
        raise ModelLoadError(str(exc)) from exc
    for index, spec in enumerate(args.models, 1):
        logger.info(
            "loading model %d of %d: %s (served as %s)",
            index,
            len(args.models),
            spec.model,
            _quoted(spec.names),
        )
    try:
        engines = list(load(configs))
    except Exception as exc:
        raise ModelLoadError(_load_failure(args.models, exc)) from exc
    if len(engines) != len(configs):
        raise ModelLoadError(f"the engine loaded {len(engines)} models for {len(configs)} specs")
    return engines


def _load_failure(models: Sequence[ModelSpec], exc: Exception) -> str:
    """Which spec failed (the one the error or its notes name, when just one) and what to do about it."""
    said = "\n".join([str(exc), *getattr(exc, "__notes__", ())])
    named = [(index, spec) for index, spec in enumerate(models, 1) if repr(spec.model) in said]
    if not named:
        named = [(index, spec) for index, spec in enumerate(models, 1) if spec.model in said]
    if len(models) == 1:
        named = [(1, models[0])]
    if len(named) == 1:
        index, spec = named[0]
        which = f"model {index} of {len(models)}, {spec.model!r} (served as {_quoted(spec.names)})"
        check = f"Check that {spec.model!r} names"
    else:
        which = "one of the models " + ", ".join(repr(spec.model) for spec in models)
        check = "Check that each MODEL / --model spec names"
    return (
        f"could not load {which}: {type(exc).__name__}: {exc}\n"
        f"{check} a packaged model ({', '.join(DEFAULT_MODELS)}), a .gguf file or an HF folder with "
        "config.json, and that its settings suit the model (e.g. max_model_len within its context); "
        "or leave that model out."
    )


def served_model(spec: ModelSpec, engine: Any, *, created: int) -> ServedModel:
    """How the API shows `engine`'s model: named by its spec, with the tasks and pooling the engine reports."""
    return ServedModel(
        names=list(spec.names),
        root=engine.root,
        tokenizer=engine.tokenizer,
        max_model_len=engine.max_model_len,
        tasks=frozenset(engine.tasks),
        pooling=pooling_info(engine.pooling),
        generation_defaults=dict(engine.generation_defaults),
        created=created,
        lora_modules=dict(getattr(engine, "lora_adapters", {})),
        lora_enabled=bool(getattr(engine, "lora_enabled", False)),
        tokenizer_config=tokenizer_config(engine.tokenizer),
        multimodal=getattr(engine, "multimodal", None),
        speech=getattr(engine, "speech", None),
    )


def tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's configuration as /tokenizer_info serves it, read now (at load) because the
    core does no IO; empty for a tokenizer that offers none (test doubles)."""
    read = getattr(tokenizer, "tokenizer_config", None)
    return dict(read()) if callable(read) else {}


def pooling_info(pooling: Any) -> PoolingInfo | None:
    """The engine's pooling facts as the protocol core takes them (None: a generative model)."""
    if pooling is None or isinstance(pooling, PoolingInfo):
        return pooling
    dimensions = pooling.matryoshka_dimensions
    return PoolingInfo(
        hidden_size=int(pooling.hidden_size),
        is_matryoshka=bool(pooling.is_matryoshka),
        matryoshka_dimensions=tuple(dimensions) if dimensions is not None else None,
        num_labels=int(pooling.num_labels),
        id2label={int(key): str(label) for key, label in dict(pooling.id2label or {}).items()},
    )


def build_asgi_app(
    args: argparse.Namespace,
    engines: Sequence[Any],
    bridge_factory: BridgeFactory,
    *,
    clock: Callable[[], float] = time.time,
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> AsgiApp:
    """The whole application: core `App` over `engines` (one per `args.models`, in order), which
    start behind bridges at lifespan startup."""
    if len(engines) != len(args.models):
        raise ValueError(
            f"{len(engines)} engine(s) for {len(args.models)} models ({', '.join(s.model for s in args.models)})"
        )
    created = int(clock())
    models = [
        served_model(spec, engine, created=created) for spec, engine in zip(args.models, engines, strict=True)
    ]
    for spec, model in zip(args.models, models, strict=True):
        logger.info(
            "serving %s as %s: tasks %s, max_model_len %d",
            spec.model,
            _quoted(model.names),
            ", ".join(sorted(model.tasks)) or "none",
            model.max_model_len,
        )
    app_config = app_config_from_args(args)
    by_name = {model.name: engine for model, engine in zip(models, engines, strict=True)}
    metrics = ServerMetrics(by_name)
    for name, engine in by_name.items():
        if hasattr(engine, "observe_latency"):  # test fakes may not report latencies
            engine.observe_latency(metrics.observer(name))
    app = App(app_config, models, clock=clock, new_id=new_id, state=metrics)
    lifecycle = EngineLifecycle(by_name, bridge_factory)
    limits = getattr(args, "fetch_limits", None) or fetch_limits_from_args(args, os.environ)
    fetcher = MediaFetcher(limits)  # its connection pool lives in the serving loop (closed at shutdown)
    return AsgiApp(
        app,
        lifecycle.clients,
        max_body_bytes=app_config.max_request_body_bytes,
        on_startup=[lifecycle.startup],
        on_shutdown=[lifecycle.shutdown, fetcher.aclose],
        fetch_media=fetcher.fetch,
        on_response=metrics.observe_http,
        log_requests=args.enable_log_requests,
        max_log_len=args.max_log_len,
        shutdown_timeout=args.shutdown_timeout,
    )


def _construct(cls: Callable[..., Any], values: Mapping[str, Any]) -> Any:
    """`cls(**values)` minus the keys `cls` does not take, which are logged (a flag not wired yet)."""
    accepted = inspect.signature(cls).parameters
    for key in values.keys() - accepted.keys():
        logger.warning(
            "%s has no %r: --%s is ignored", getattr(cls, "__name__", cls), key, key.replace("_", "-")
        )
    return cls(**{key: value for key, value in values.items() if key in accepted})


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _version() -> str:
    try:
        return version("sansllm")
    except PackageNotFoundError:
        return "0.0.0"
