"""`python -m runtime_asyncio [MODEL] [flags]`: `sansllm serve` with the runtime fixed to asyncio."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from runtime_asyncio.bridge import AsyncioEngineBridge
from runtime_asyncio.serve import run
from sansllm.args import parse_serve_args
from sansllm.launch import configure_logging, launch


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_serve_args(argv, prog="python -m runtime_asyncio", runtime="asyncio")
    configure_logging(args.log_level)
    launch(args, AsyncioEngineBridge, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
