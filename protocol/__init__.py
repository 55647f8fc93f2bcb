"""sansllm's Sans-IO protocol core: OpenAI-compatible requests in, engine commands and responses out.

`App(config, models, clock=..., new_id=...).handle(method, path, headers, body)` returns a `Call`;
a runtime plays its outputs (`StartResponse`, `Body`, `EndResponse`, `Submit`) and feeds it the
engine's events. See DESIGN.md.
"""

from protocol.app import App, AppConfig
from protocol.calls import Call
from protocol.engine_api import (
    Abort,
    Command,
    Encode,
    Event,
    Failed,
    Generate,
    Pooled,
    PoolingParams,
    SamplingParams,
    StructuredOutput,
    TokenLogprobs,
    Tokens,
)
from protocol.errors import ProtocolError
from protocol.model import ServedModel
from protocol.outputs import Body, EndResponse, Output, StartResponse, Submit
from protocol.state import Health, ServerStatus
from protocol.tokenizer import Tokenizer

__all__ = [
    "Abort",
    "App",
    "AppConfig",
    "Body",
    "Call",
    "Command",
    "Encode",
    "EndResponse",
    "Event",
    "Failed",
    "Generate",
    "Health",
    "Output",
    "Pooled",
    "PoolingParams",
    "ProtocolError",
    "SamplingParams",
    "ServedModel",
    "ServerStatus",
    "StartResponse",
    "StructuredOutput",
    "Submit",
    "TokenLogprobs",
    "Tokenizer",
    "Tokens",
]
