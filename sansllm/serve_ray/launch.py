"""`sansllm serve --ray ...`: the same command line, served by engine replicas on Ray Serve.

The replicas get the command line minus what only the launcher uses (`--ray*`, `--host`,
`--port`: those are Ray's HTTP proxy's), the rest of the deployment comes from `--ray-replicas`
and `--ray-option KEY=VALUE` (`sansllm.serve_ray.options.RayAppOptions`). Connects to the cluster
`$RAY_ADDRESS` names, or starts a local one, and serves until interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from collections.abc import Sequence

from sansllm.serve_ray.options import parse_app_options

logger = logging.getLogger(__name__)

_LAUNCHER_FLAGS = {"--ray": False, "--ray-replicas": True, "--ray-option": True, "--host": True, "--port": True}


def replica_argv(argv: Sequence[str]) -> list[str]:
    """`argv` without the flags only the launcher reads (a flag's value too, `--flag=value` alike)."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name in _LAUNCHER_FLAGS:
            skip_value = _LAUNCHER_FLAGS[name] and "=" not in arg
            continue
        kept.append(arg)
    return kept


def app_arguments(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, str]:
    """The builder's arguments for this command line (checked: a bad option is a ValueError)."""
    if args.ssl_certfile or args.uds:
        raise ValueError(
            "Ray's HTTP proxy serves plain HTTP on --host/--port: terminate TLS in front of it (a load "
            "balancer, an ingress controller) and drop --ssl-certfile/--uds"
        )
    options = {"serve_args": shlex.join(replica_argv(argv)), "num_replicas": str(args.ray_replicas)}
    for item in args.ray_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--ray-option takes KEY=VALUE, not {item!r}")
        options[key.strip()] = value
    parse_app_options(options)
    return options


def serve_on_ray(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Deploy and serve until Ctrl-C (blocks); the deployment is removed on the way out."""
    try:
        options = app_arguments(args, argv)
    except ValueError as exc:
        raise SystemExit(f"sansllm serve --ray: {exc}") from None
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("sansllm serve --ray needs Ray Serve: pip install 'sansllm[ray]'") from None
    from sansllm.serve_ray.app import build_app

    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
    else:
        logger.info("starting a local Ray cluster (set RAY_ADDRESS to join one)")
    ray.init(address=address or None)
    serve.start(http_options={"host": args.host, "port": args.port})
    logger.info("deploying %d engine replica(s): %s", args.ray_replicas, options)
    try:
        serve.run(build_app(options), name="sansllm", route_prefix="/", blocking=True)
    finally:
        serve.delete("sansllm")
