"""`--tool-parser-plugin` / `--reasoning-parser-plugin`: run a user's parser file, then check the names.

A plugin is a Python file that registers its class with
`protocol.output.tool_parsers.register_tool_parser("name")` (or `register_reasoning_parser`), the
way vLLM's plugins use `ToolParserManager.register_module`. Loading it is IO, so it happens here,
at start-up, never in the protocol core.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path

from protocol.output.reasoning import reasoning_parser
from protocol.output.tool_parsers import tool_parser


def load_plugin(path: str) -> None:
    """Execute the file as a module (its registrations run); ValueError says what went wrong."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"parser plugin {path!r} is not a file")
    name = f"sansllm_parser_plugin_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"parser plugin {path!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's file: report, do not crash with a trace
        raise ValueError(f"parser plugin {path!r} failed to load: {type(error).__name__}: {error}") from None


def check_parser_args(args: argparse.Namespace) -> None:
    """Load the plugins, then check the parser flags; ValueError with what to change."""
    for path in (args.tool_parser_plugin, args.reasoning_parser_plugin):
        if path:
            load_plugin(path)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME (e.g. hermes)")
    if args.tool_call_parser:
        try:
            tool_parser(args.tool_call_parser)
        except KeyError as error:
            raise ValueError(f"--tool-call-parser: {error.args[0]}") from None
    if args.reasoning_parser:
        try:
            reasoning_parser(args.reasoning_parser)
        except KeyError as error:
            raise ValueError(f"--reasoning-parser: {error.args[0]}") from None
