"""The engine's public surface is small and pinned: code outside the engine imports only these names."""

from __future__ import annotations

import ast
from pathlib import Path

import engine

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = ["sansllm", "runtime_asyncio", "runtime_trio", "bench", "examples", "protocol", "fuzz", "tests/runtime"]
# Micro-benchmarks that time one engine part alone, on purpose, and what they may reach.
MICRO_BENCHMARKS = {"bench/sampler_step.py": {"engine.sampler", "engine.allocator"}}


def test_the_public_surface_is_what_it_says():
    assert sorted(engine.__all__) == sorted(
        [
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
            "resolve_model",
            "fetch_whisper",
            "whisper_ct2_folder",
        ]
    )
    assert all(hasattr(engine, name) for name in engine.__all__)


def test_code_outside_the_engine_imports_only_its_public_surface():
    offenders = []
    for folder in OUTSIDE:
        for path in (ROOT / folder).rglob("*.py"):
            allowed = MICRO_BENCHMARKS.get(str(path.relative_to(ROOT)), set())
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module in allowed:
                    continue
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engine."):
                    offenders.append(f"{path.relative_to(ROOT)}: from {node.module} import ...")
                elif isinstance(node, ast.Import):
                    offenders += [
                        f"{path.relative_to(ROOT)}: import {a.name}" for a in node.names if a.name.startswith("engine.")
                    ]
    assert offenders == []
