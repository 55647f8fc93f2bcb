"""Reasoning parsers: split a model's thinking (`<think>...</think>`) from its answer, streamed.

`reasoning_parser(name)` returns the class registered under `name`; `register_reasoning_parser`
registers one (built-ins below, plugins the same way).
"""

from protocol.output.reasoning import deepseek_r1, qwen3  # noqa: F401  (registers the built-in parsers)
from protocol.output.reasoning.base import ReasoningParser
from protocol.output.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from protocol.output.reasoning.qwen3 import Qwen3ReasoningParser
from protocol.output.reasoning.registry import REASONING_PARSERS, reasoning_parser, register_reasoning_parser

__all__ = [
    "REASONING_PARSERS",
    "DeepSeekR1ReasoningParser",
    "Qwen3ReasoningParser",
    "ReasoningParser",
    "reasoning_parser",
    "register_reasoning_parser",
]
