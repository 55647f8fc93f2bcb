"""Run a server from parsed flags on a given runtime: bind first, then load the models, then serve."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from hypercorn.config import Config as HypercornConfig

from protocol.asgi import AsgiApp
from sansllm.assemble import ModelLoadError, build_asgi_app, load_engines
from sansllm.lifecycle import BridgeFactory
from sansllm.listen import bind_early, hypercorn_config_from_args

logger = logging.getLogger(__name__)

Runner = Callable[[AsgiApp, HypercornConfig], None]


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    # hypercorn's loggers carry their own handlers; propagating to ours would print every line twice.
    for name in ("hypercorn.error", "hypercorn.access"):
        logging.getLogger(name).propagate = False


def launch(args: argparse.Namespace, bridge_factory: BridgeFactory, run: Runner) -> None:
    """Bind, load the engines, and serve until SIGINT/SIGTERM (blocks).

    A model that cannot be loaded stops startup: its message is logged and the process exits with 1.
    """
    config = hypercorn_config_from_args(args)
    models = ", ".join(spec.model for spec in args.models)
    for address in bind_early(config):
        logger.info("bound %s; loading %d model(s): %s", address, len(args.models), models)
    try:
        engines = load_engines(args)
    except ModelLoadError as exc:
        logger.error("%s", exc)
        raise SystemExit(1) from None
    run(build_asgi_app(args, engines, bridge_factory), config)
