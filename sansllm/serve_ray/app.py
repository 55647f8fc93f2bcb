"""sansllm on Ray Serve: engine replicas behind an ingress with prefix-cache-aware routing.

    serve run sansllm.serve_ray:build_app model=SmolLM2-135M-Instruct num_replicas=2

Two deployments. `EngineReplica` loads the models (the same flags as `sansllm serve`) and runs the
same ASGI app `sansllm serve` runs, protocol core and asyncio bridge included; `OpenAIIngress`
is the HTTP entry Ray's proxy calls: it reads each request, names its prompt prefix and forwards
it to a replica through a deployment handle whose router (`PrefixAffinityRouter`) prefers the
replica that served that prefix last. With `ingress=false` Ray's proxy calls the replicas' ASGI
app directly (one hop less, Ray's power-of-two routing: the proxy cannot read bodies to route).

Health: Ray calls `check_health` (the engine threads are alive); a failing replica is replaced.
Drain: a stopping replica gets no new requests from Ray, then the ASGI app's drain gives those in
flight `graceful_shutdown_timeout_s` and ends the rest with an SSE error frame before the engines
stop. Metrics: each replica copies its `/metrics` into Ray's export (`metrics_export.py`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import ray
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from protocol.asgi import AsgiApp
from sansllm.args import parse_serve_args
from sansllm.asgi_factory import bridge_for_running_library
from sansllm.assemble import app_config_from_args, build_asgi_app, load_engines
from sansllm.prefix_routing import PrefixAffinity
from sansllm.serve_ray.forwarding import (
    REPLICA_HEADER,
    ForwardedRequest,
    Lifespan,
    Message,
    Relay,
    play_forwarded,
)
from sansllm.serve_ray.metrics_export import RegistryExporter
from sansllm.serve_ray.options import RayAppOptions, parse_app_options

logger = logging.getLogger("sansllm.serve_ray")

METRICS_INTERVAL_S = float(os.environ.get("SANSLLM_RAY_METRICS_INTERVAL_S", "5"))


class _EngineReplicaBase:
    """One engine process: every model of the `sansllm serve` command line, on one engine thread,
    behind the same ASGI app `sansllm serve` runs."""

    def _setup(self, serve_argv: list[str], graceful_shutdown_timeout_s: float) -> None:
        args = parse_serve_args(serve_argv, prog="sansllm (Ray replica)")
        logging.getLogger("sansllm").setLevel(args.log_level.upper())
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        logger.info("replica %s: loading %s", self.replica_id, ", ".join(spec.model for spec in args.models))
        self.engines = load_engines(args)
        self.server = build_asgi_app(args, self.engines, bridge_for_running_library)
        self.server.on_startup.append(self._start_metrics)
        self.server.on_shutdown.insert(0, self._drain)  # before the engines stop
        self.drain_timeout = graceful_shutdown_timeout_s
        self._exporter_task: asyncio.Task[None] | None = None

    def check_health(self) -> None:
        """Ray's health check: an engine thread that died makes the replica unhealthy (replaced)."""
        if not self.server.healthy:
            raise RuntimeError(f"replica {self.replica_id}: an engine thread stopped; see its log")

    def describe(self) -> dict[str, Any]:
        """This replica at a glance (operators, tests): its id, process, torch threads (Ray's
        OMP_NUM_THREADS follows num_cpus) and the requests its engines run or queue."""
        import torch  # loaded already: the engines run on it

        snapshots = [engine.stats() for engine in self.engines]
        return {
            "replica": self.replica_id,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "requests_in_engine": sum(int(snap.num_running) + int(snap.num_waiting) for snap in snapshots),
        }

    async def _drain(self) -> None:
        if self._exporter_task is not None:
            self._exporter_task.cancel()
        await self.server.drain(self.drain_timeout)

    async def _start_metrics(self) -> None:
        registry = getattr(self.server.app.state, "registry", None)
        if registry is None:
            return
        exporter = RegistryExporter(
            registry, counter=serve_metrics.Counter, gauge=serve_metrics.Gauge, histogram=serve_metrics.Histogram
        )

        async def run() -> None:
            while True:
                try:
                    exporter.export()
                except Exception:  # a metrics hiccup must never take the replica down
                    logger.exception("copying metrics to Ray failed")
                await asyncio.sleep(METRICS_INTERVAL_S)

        self._exporter_task = asyncio.get_running_loop().create_task(run())


class EngineReplica(_EngineReplicaBase):
    """An engine replica behind the ingress: requests arrive through `forward`."""

    async def __init__(self, serve_argv: list[str], graceful_shutdown_timeout_s: float) -> None:
        self._setup(serve_argv, graceful_shutdown_timeout_s)
        self._lifespan = Lifespan(self.server)
        await self._lifespan.startup()  # the engines start behind their bridges on this loop

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[list[Message]]:
        """Play one request from the ingress through the app, streaming back its ASGI messages."""
        async for batch in play_forwarded(self.server, request, [(REPLICA_HEADER, self.replica_id.encode())]):
            yield batch

    async def __del__(self) -> None:
        """Ray stops a replica: drain (the app's first shutdown hook), then stop the engines."""
        await self._lifespan.shutdown()


@serve.ingress()
class DirectEngineReplica(_EngineReplicaBase):
    """An engine replica that Ray's proxy calls directly (`ingress=false`); Ray runs its lifespan."""

    def __init__(self, serve_argv: list[str], graceful_shutdown_timeout_s: float) -> None:
        self._setup(serve_argv, graceful_shutdown_timeout_s)

    def __serve_build_asgi_app__(self) -> AsgiApp:
        return self.server


@serve.ingress()
class OpenAIIngress:
    """The OpenAI API's HTTP entry: forwards each request to an engine replica, streams the answer."""

    def __init__(self, engine: DeploymentHandle, options: dict[str, Any], max_body_bytes: int) -> None:
        opts = RayAppOptions(**options)
        self.engine = engine
        affinity = PrefixAffinity(chunk_chars=opts.chunk_chars) if opts.routing == "prefix" else None
        self.relay = Relay(
            self._call, replica_gone, affinity=affinity, max_body_bytes=max_body_bytes, retries=opts.retries
        )

    def __serve_build_asgi_app__(self) -> Relay:
        return self.relay

    def relay_stats(self) -> dict[str, int]:
        """Requests in flight and requests resent after their replica went away (tests, operators)."""
        return {"in_flight": self.relay.in_flight, "resent": self.relay.resent}

    def _call(self, request: ForwardedRequest) -> AsyncIterator[list[Message]]:
        return self.engine.options(method_name="forward", stream=True).remote(request)


def replica_gone(exc: BaseException) -> bool:
    """A Ray error that means the replica (actor) went away, not that the request failed there."""
    return isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError)


def build_app(args: Mapping[str, Any] | None = None) -> serve.Application:
    """The application `serve run sansllm.serve_ray:build_app key=value ...` deploys (options:
    `sansllm.serve_ray.options.RayAppOptions`)."""
    return build_app_from_options(parse_app_options(args or {}))


def build_app_from_options(opts: RayAppOptions) -> serve.Application:
    serve_args = parse_serve_args(opts.serve_argv, prog="sansllm (Ray)")  # flag errors now, not in replicas
    actor_options: dict[str, Any] = {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus}
    if opts.memory is not None:
        actor_options["memory"] = opts.memory
    engine_options: dict[str, Any] = {
        "name": "SansllmEngine",
        "ray_actor_options": actor_options,
        "max_ongoing_requests": opts.max_ongoing_requests,
        "graceful_shutdown_timeout_s": opts.graceful_shutdown_timeout_s + 5,  # our drain ends first
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": opts.health_check_period_s,
        "health_check_timeout_s": opts.health_check_timeout_s,
    }
    autoscaling = opts.autoscaling_config
    if autoscaling is not None:
        engine_options["autoscaling_config"] = autoscaling
    else:
        engine_options["num_replicas"] = opts.num_replicas
    if opts.routing == "prefix":
        engine_options["request_router_config"] = RequestRouterConfig(
            request_router_class="sansllm.serve_ray.router:PrefixAffinityRouter",
            request_router_kwargs={"imbalance": opts.imbalance, "chunk_chars": opts.chunk_chars},
        )
    engine = serve.deployment(EngineReplica if opts.ingress else DirectEngineReplica).options(**engine_options)
    engine_app = engine.bind(opts.serve_argv, opts.graceful_shutdown_timeout_s)
    if not opts.ingress:
        return engine_app
    ingress = serve.deployment(OpenAIIngress).options(
        name="SansllmIngress",
        num_replicas=opts.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, opts.max_ongoing_requests * (opts.max_replicas or opts.num_replicas)),
        graceful_shutdown_timeout_s=opts.graceful_shutdown_timeout_s + 10,
    )
    max_body_bytes = app_config_from_args(serve_args).max_request_body_bytes
    return ingress.bind(engine_app, _plain(opts), max_body_bytes)


def _plain(opts: RayAppOptions) -> dict[str, Any]:
    return {name: getattr(opts, name) for name in opts.__struct_fields__}
