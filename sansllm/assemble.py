"""Build the server from parsed `serve` flags: engine(s), served models, the core `App`, the ASGI shell.

Runtime-neutral: the caller passes the bridge factory of its runtime (or one that picks the
runtime at startup), so this module imports neither asyncio nor trio.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from protocol.app import App, AppConfig
from protocol.asgi import AsgiApp
from protocol.model import ServedModel
from sansllm.chat_template import load_chat_template
from sansllm.lifecycle import BridgeFactory, EngineLifecycle

logger = logging.getLogger(__name__)

_DTYPE_ALIASES = {"float": "float32", "half": "float16"}


def engine_config_from_args(args: argparse.Namespace, config_cls: Callable[..., Any]) -> Any:
    """The engine's config from the flags; flags its config does not know (yet) are logged and dropped."""
    wanted = {
        "model": args.model,
        "dtype": _DTYPE_ALIASES.get(args.dtype, args.dtype),
        "max_model_len": args.max_model_len,
        "seed": args.seed,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory": args.kv_cache_memory,
        "batch_invariant": args.batch_invariant or None,
    }
    return _construct(config_cls, {key: value for key, value in wanted.items() if value is not None})


def app_config_from_args(args: argparse.Namespace) -> AppConfig:
    """The core's options from the flags (the chat template file is read here: the core does no IO)."""
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
        root_path=args.root_path,
        version=_version(),
    )


def load_engines(args: argparse.Namespace) -> list[Any]:
    """Load the model named by the flags into an engine (slow: the weights are read here)."""
    from engine.engine import Engine, EngineConfig  # torch is imported only when a model is served

    return [Engine(engine_config_from_args(args, EngineConfig))]


def served_model(args: argparse.Namespace, engine: Any, *, created: int) -> ServedModel:
    """How the API shows `engine`'s model: named by --served-model-name, else by the model flag."""
    return ServedModel(
        names=list(args.served_model_name or [args.model]),
        root=engine.root,
        tokenizer=engine.tokenizer,
        max_model_len=engine.max_model_len,
        tasks=frozenset(engine.tasks),
        generation_defaults=dict(engine.generation_defaults),
        created=created,
    )


def build_asgi_app(
    args: argparse.Namespace,
    engines: Sequence[Any],
    bridge_factory: BridgeFactory,
    *,
    clock: Callable[[], float] = time.time,
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> AsgiApp:
    """The whole application: core `App` over `engines`, which start behind bridges at lifespan startup."""
    created = int(clock())
    models = [served_model(args, engine, created=created) for engine in engines]
    app_config = app_config_from_args(args)
    app = App(app_config, models, clock=clock, new_id=new_id)
    by_name = {model.name: engine for model, engine in zip(models, engines, strict=True)}
    lifecycle = EngineLifecycle(by_name, bridge_factory)
    return AsgiApp(
        app,
        lifecycle.clients,
        max_body_bytes=app_config.max_request_body_bytes,
        on_startup=[lifecycle.startup],
        on_shutdown=[lifecycle.shutdown],
    )


def _construct(cls: Callable[..., Any], values: Mapping[str, Any]) -> Any:
    """`cls(**values)` minus the keys `cls` does not take, which are logged (a flag not wired yet)."""
    accepted = inspect.signature(cls).parameters
    for key in values.keys() - accepted.keys():
        logger.warning(
            "%s has no %r: --%s is ignored", getattr(cls, "__name__", cls), key, key.replace("_", "-")
        )
    return cls(**{key: value for key, value in values.items() if key in accepted})


def _version() -> str:
    try:
        return version("sansllm")
    except PackageNotFoundError:
        return "0.0.0"
