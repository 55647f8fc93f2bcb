"""Per-request state machines: what a request turns into, and how engine events become output."""

from protocol.calls.base import Call, CallIdentity, CallSettings, ImmediateCall, error_call, json_call
from protocol.calls.chat import ChatCall, build_chat_call
from protocol.calls.completion import CompletionCall, build_completion_call
from protocol.calls.encode import EncodeCall
from protocol.calls.generation import GenerationCall, UsageOptions
from protocol.calls.pooling import build_classification_call, build_embedding_call, build_pooling_call
from protocol.calls.prompt import ChatRenderer
from protocol.calls.score import build_rerank_call, build_score_call

__all__ = [
    "Call",
    "CallIdentity",
    "CallSettings",
    "ChatCall",
    "ChatRenderer",
    "CompletionCall",
    "EncodeCall",
    "GenerationCall",
    "ImmediateCall",
    "UsageOptions",
    "build_chat_call",
    "build_classification_call",
    "build_completion_call",
    "build_embedding_call",
    "build_pooling_call",
    "build_rerank_call",
    "build_score_call",
    "error_call",
    "json_call",
]
