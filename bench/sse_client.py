"""Streaming OpenAI completions clients for the serving benchmark (httpx async, SSE parsed by hand).

SSE framing here is one `data: <json>` line per event, as vLLM and OpenAI send it; a hand parser
of a few lines avoids another dependency. Each chunk that carries text is stamped on arrival, like
vLLM's benchmark_serving; the final usage chunk gives the token counts.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Sequence
from typing import Any

import httpx
import msgspec

from bench.prompts import BenchPrompt
from bench.stats import RequestTiming

REQUEST_TIMEOUT_S = 600.0


class RequestFailed(RuntimeError):
    pass


def completion_body(model: str, prompt: BenchPrompt, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Greedy, exactly `output_len` tokens (ignore_eos), streamed, with usage at the end; `extra`
    fields (sampling parameters) are merged over these. A list as `extra`'s "model" spreads the
    requests over those models (LoRA adapters, say), each prompt always to the same one."""
    body = {
        "model": model,
        "prompt": prompt.text,
        "max_tokens": prompt.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    if isinstance(body["model"], list):
        body["model"] = body["model"][zlib.crc32(prompt.text.encode()) % len(body["model"])]
    return body


def _read_usage(timing: RequestTiming, usage: dict[str, Any]) -> None:
    timing.output_tokens = usage.get("completion_tokens") or 0
    timing.prompt_tokens = usage.get("prompt_tokens") or 0
    details = usage.get("prompt_tokens_details") or {}
    timing.cached_tokens = details.get("cached_tokens") or 0


async def stream_completion(
    client: httpx.AsyncClient, model: str, prompt: BenchPrompt, extra: dict[str, Any] | None = None
) -> RequestTiming:
    """One streamed /v1/completions request, timed from just before it is sent."""
    timing = RequestTiming(start=time.perf_counter())
    body = completion_body(model, prompt, extra)
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RequestFailed(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = msgspec.json.decode(payload)
            if "error" in chunk:
                raise RequestFailed(f"error in stream: {chunk['error']}")
            if any(choice.get("text") for choice in chunk.get("choices") or ()):
                timing.chunk_times.append(time.perf_counter())
            if chunk.get("usage"):
                _read_usage(timing, chunk["usage"])
    return timing


async def run_clients(
    base_url: str,
    model: str,
    prompts: Sequence[BenchPrompt],
    concurrency: int,
    extra: dict[str, Any] | None = None,
) -> list[RequestTiming]:
    """Every prompt, with at most `concurrency` requests in flight at any moment; timings in prompt order."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def one(prompt: BenchPrompt) -> RequestTiming:
            async with gate:
                return await stream_completion(client, model, prompt, extra)

        return list(await asyncio.gather(*(one(p) for p in prompts)))


async def served_model_name(base_url: str, prefer: str | None = None) -> str:
    """`prefer` if the server lists it, else the first model it lists: requests must name one."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        names = [model["id"] for model in response.json()["data"]]
        return prefer if prefer in names else names[0]
