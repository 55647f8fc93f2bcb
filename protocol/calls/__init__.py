"""Per-request state machines: what a request turns into, and how engine events become output."""

from protocol.calls.base import Call, CallSettings, ImmediateCall, error_call, json_call
from protocol.calls.chat import ChatCall, build_chat_call
from protocol.calls.completion import CompletionCall, build_completion_call
from protocol.calls.generation import GenerationCall, UsageOptions
from protocol.calls.prompt import ChatRenderer

__all__ = [
    "Call",
    "CallSettings",
    "ChatCall",
    "ChatRenderer",
    "CompletionCall",
    "GenerationCall",
    "ImmediateCall",
    "UsageOptions",
    "build_chat_call",
    "build_completion_call",
    "error_call",
    "json_call",
]
