"""An ASGI app factory for running under plain hypercorn, with flags from `$SANSLLM_ARGS`.

    SANSLLM_ARGS="SmolLM2-135M-Instruct --api-key k" \
        hypercorn 'sansllm.asgi_factory:create_app()' -k trio --bind 127.0.0.1:8000

Hypercorn owns the sockets then (its --bind, --certfile, ... apply, not ours); the engine bridge
matches whichever async library hypercorn's worker runs, detected at lifespan startup.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

import sniffio

from protocol.asgi import AsgiApp
from sansllm.args import parse_serve_args
from sansllm.assemble import build_asgi_app, load_engines
from sansllm.lifecycle import Bridge

ARGS_ENV_VAR = "SANSLLM_ARGS"


def create_app(argv: Sequence[str] | None = None) -> AsgiApp:
    """Load the engine(s) named by `argv` (default: `$SANSLLM_ARGS`) and build the ASGI app."""
    if argv is None:
        argv = shlex.split(os.environ.get(ARGS_ENV_VAR, ""))
    args = parse_serve_args(argv, prog=f"${ARGS_ENV_VAR}")
    return build_asgi_app(args, load_engines(args), bridge_for_running_library)


def bridge_for_running_library(engine: object) -> Bridge:
    """The bridge for the async library running right now (call from inside the event loop)."""
    library = sniffio.current_async_library()
    if library == "trio":
        from runtime_trio.bridge import TrioEngineBridge

        return TrioEngineBridge(engine)
    if library == "asyncio":
        from runtime_asyncio.bridge import AsyncioEngineBridge

        return AsyncioEngineBridge(engine)
    raise RuntimeError(f"sansllm runs on asyncio or trio, not {library}")
