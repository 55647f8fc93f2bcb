"""bench.cold_start names the phases of a start from the server's log lines."""

from __future__ import annotations

from datetime import datetime

import pytest

from bench.cold_start import Run, phases_from_log, table

LOG = """\
INFO 2026-11-30 13:00:01,000 sansllm.launch: bound 127.0.0.1:8000; loading 2 model(s): A, B
INFO 2026-11-30 13:00:01,100 sansllm.assemble: loading model 1 of 2: A (served as 'A')
INFO 2026-11-30 13:00:01,100 sansllm.assemble: loading model 2 of 2: B (served as 'B')
INFO 2026-11-30 13:00:03,100 engine.engine: loading A from /x/a.gguf
INFO 2026-11-30 13:00:03,200 engine.loader: A: read the GGUF header in 0.10 s
INFO 2026-11-30 13:00:04,200 engine.loader: A: dequantized and loaded the weights (torch.float32) in 1.00 s
INFO 2026-11-30 13:00:04,250 engine.tokenizer: loaded the converted GGUF tokenizer from /c in 0.05 s
INFO 2026-11-30 13:00:04,300 engine.loader: A: built the tokenizer in 0.10 s
INFO 2026-11-30 13:00:05,300 engine.engine: loading B from /x/b
INFO 2026-11-30 13:00:05,800 engine.loader: B: loaded the weights (torch.float32) in 0.50 s
INFO 2026-11-30 13:00:05,900 engine.loader: B: built the tokenizer in 0.10 s
INFO 2026-11-30 13:00:06,000 sansllm.assemble: serving A as 'A': tasks generate, max_model_len 8192
INFO 2026-11-30 13:00:06,000 sansllm.assemble: serving B as 'B': tasks embed, max_model_len 256
[2026-11-30 13:00:06 +0000] [1] [INFO] Running on http://127.0.0.1:8000 (CTRL + C to quit)
INFO 2026-11-30 13:00:06,100 hypercorn.error: Running on http://127.0.0.1:8000 (CTRL + C to quit)
"""


def at(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_phases_cover_launch_to_healthy_in_order():
    launched, healthy = at("2026-11-30 13:00:00,000"), at("2026-11-30 13:00:06,200")
    phases = phases_from_log(LOG, launched, healthy)
    got = {label: round(seconds, 3) for label, seconds in phases}
    assert got == {
        "python start + CLI imports (sansllm, protocol, hypercorn), bind": 1.0,
        "import engine (torch, kernels, models)": 0.1,
        "resolve model, engine thread": 2.0,
        "A: read the GGUF header": 0.1,
        "A: dequantized and loaded the weights (torch.float32)": 1.0,
        "A: built the tokenizer": 0.1,
        "A: pack weights, kernels.prepare, KV cache": 1.0,
        "B: loaded the weights (torch.float32)": 0.5,
        "B: built the tokenizer": 0.1,
        "B: pack weights, kernels.prepare, KV cache": 0.1,
        "ASGI app, hypercorn start": 0.1,
        "first healthy GET /health": 0.1,
    }
    assert sum(got.values()) == pytest.approx(healthy - launched)


def test_a_checkout_without_loader_lines_shows_each_load_whole():
    log = "\n".join(line for line in LOG.splitlines() if "engine.loader" not in line)
    phases = dict(phases_from_log(log, at("2026-11-30 13:00:00,000"), at("2026-11-30 13:00:06,200")))
    assert phases["A: load (weights, tokenizer), pack, kernels, KV cache"] == pytest.approx(2.2)
    assert phases["B: load (weights, tokenizer), pack, kernels, KV cache"] == pytest.approx(0.7)


def test_table_gives_each_phase_its_share_of_the_last_run():
    runs = [Run(4.0, [("a", 3.0), ("b", 1.0)]), Run(2.0, [("a", 1.0), ("b", 1.0)])]
    text = table("t", runs)
    assert "| a | 3.00 | 1.00 | 50% |" in text
    assert "| **launch to healthy /health** | **4.00** | **2.00** | 100% |" in text
