"""The `sansllm` console script: `sansllm serve [MODEL] [flags]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sansllm.args import add_serve_arguments, parse_serve_args
from sansllm.launch import configure_logging, launch


def build_cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sansllm", description="An OpenAI-compatible LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve", help="serve a model over the OpenAI-compatible API"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        build_cli_parser().parse_args(argv)  # prints usage or help and exits
        return 2
    args = parse_serve_args(argv[1:], prog="sansllm serve")
    configure_logging(args.log_level)
    if args.ray:
        from sansllm.serve_ray.launch import serve_on_ray

        serve_on_ray(args, argv[1:])
    elif args.runtime == "trio":
        from runtime_trio.bridge import TrioEngineBridge
        from runtime_trio.serve import run

        launch(args, TrioEngineBridge, run)
    else:
        from runtime_asyncio.bridge import AsyncioEngineBridge
        from runtime_asyncio.serve import run

        launch(args, AsyncioEngineBridge, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
