"""The Ray Serve application's options, from `serve run ... key=value` arguments or a config file.

Ray hands an application builder its arguments as strings (`serve run
sansllm.serve_ray:build_app model=SmolLM2-135M-Instruct num_replicas=2`) or, from a `serve deploy`
config file, as YAML values; both are converted and checked here, so a typo is an error that names
the key rather than a silently ignored setting. Pure: no Ray.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from sansllm.prefix_routing import DEFAULT_CHUNK_CHARS

DEFAULT_IMBALANCE = 4
DEFAULT_MAX_ONGOING_REQUESTS = 64  # per replica: the engine batches them; more wait in its queue
DEFAULT_GRACEFUL_SHUTDOWN_S = 30.0  # a stopping replica's requests in flight get this long


class RayAppOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What `build_app` deploys. `model` and `serve_args` are `sansllm serve`'s MODEL and flags,
    given to every engine replica; the rest shape the deployments."""

    model: str | None = None  # None: the packaged default models, as `sansllm serve` with none
    serve_args: str = ""  # more `sansllm serve` flags, e.g. "--max-model-len 4096 --api-key k"
    num_replicas: int = 1  # fixed replica count (ignored when min/max_replicas are set)
    min_replicas: int | None = None  # autoscaling bounds: both set turns Ray's autoscaler on
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # per replica, what the autoscaler aims at
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS
    num_cpus: float = 1.0  # per engine replica (its torch threads follow Ray's OMP_NUM_THREADS)
    num_gpus: float = 0.0
    memory: int | None = None  # bytes Ray reserves per engine replica (scheduling only)
    routing: Literal["prefix", "pow2"] = "prefix"  # prefix-cache affinity, or Ray's power of two
    imbalance: int = DEFAULT_IMBALANCE  # queued requests a cache hit may cost (prefix routing)
    chunk_chars: int = DEFAULT_CHUNK_CHARS  # prompt characters per routing key
    ingress: bool = True  # False: Ray's proxy calls the replicas' ASGI app directly (no prefix routing)
    ingress_replicas: int = 1
    graceful_shutdown_timeout_s: float = DEFAULT_GRACEFUL_SHUTDOWN_S
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    retries: int = 3  # times a request is resent when its replica died before answering

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.ingress_replicas < 1:
            raise ValueError("num_replicas and ingress_replicas must be at least 1")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both min_replicas and max_replicas to autoscale, or neither")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= (self.max_replicas or 0):
            raise ValueError("autoscaling needs 0 <= min_replicas <= max_replicas, and max_replicas >= 1")
        if self.max_replicas == 0:
            raise ValueError("max_replicas must be at least 1")
        if self.chunk_chars < 16 or self.imbalance < 0 or self.retries < 0 or self.max_ongoing_requests < 1:
            raise ValueError("chunk_chars >= 16, imbalance >= 0, retries >= 0, max_ongoing_requests >= 1")
        if self.routing == "prefix" and not self.ingress:
            raise ValueError(
                "routing=prefix needs the ingress (it reads the request body to route); "
                "with ingress=false use routing=pow2"
            )

    @property
    def serve_argv(self) -> list[str]:
        """The `sansllm serve` command line each engine replica parses."""
        return ([self.model] if self.model else []) + shlex.split(self.serve_args)

    @property
    def autoscaling_config(self) -> dict[str, Any] | None:
        if self.min_replicas is None:
            return None
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


def parse_app_options(args: Mapping[str, Any]) -> RayAppOptions:
    """Options from the builder's arguments (strings from `serve run`, typed values from YAML);
    `ValueError` names the key at fault."""
    fields = set(RayAppOptions.__struct_fields__)
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"unknown sansllm Ray option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    try:
        # strings from the command line become ints, floats and booleans where the field wants one
        return msgspec.convert(dict(args), RayAppOptions, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"sansllm Ray options: {exc}") from None
