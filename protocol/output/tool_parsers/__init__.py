"""Tool parsers: turn a model's tool-call syntax into OpenAI tool-call deltas, streamed.

`tool_parser(name)` returns the class registered under `name`; `register_tool_parser` registers
one (the built-ins below, and `--tool-parser-plugin` files the same way).
"""

from protocol.output.tool_parsers import hermes, llama3_json, mistral, pythonic  # noqa: F401  (registers them)
from protocol.output.tool_parsers.base import ToolParser, ToolSpec, default_call_id
from protocol.output.tool_parsers.hermes import HermesToolParser
from protocol.output.tool_parsers.llama3_json import Llama3JsonToolParser
from protocol.output.tool_parsers.mistral import MistralToolParser, mistral_call_id
from protocol.output.tool_parsers.pythonic import PythonicToolParser
from protocol.output.tool_parsers.registry import TOOL_PARSERS, register_tool_parser, tool_parser

__all__ = [
    "TOOL_PARSERS",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "PythonicToolParser",
    "ToolParser",
    "ToolSpec",
    "default_call_id",
    "mistral_call_id",
    "register_tool_parser",
    "tool_parser",
]
