"""`python -m runtime_trio [MODEL] [flags]`: `sansllm serve` with the runtime fixed to trio."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from runtime_trio.bridge import TrioEngineBridge
from runtime_trio.serve import run
from sansllm.args import parse_serve_args
from sansllm.launch import configure_logging, launch


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_serve_args(argv, prog="python -m runtime_trio", runtime="trio")
    configure_logging(args.log_level)
    launch(args, TrioEngineBridge, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
