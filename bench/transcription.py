"""Speech-to-text speed: `sansllm serve` against faster-whisper called directly, same weights, same audio.

    .venv/bin/python -m bench.transcription [--model whisper-tiny.en] [--seconds 60] [--concurrency 8] [--record]

The audio is English speech made with espeak-ng (sentences joined to `--seconds`, as 16 kHz WAV).
Two measurements, each for both systems, one system at a time so they never share the CPU:

- real-time factor of one `--seconds` file (processing time / audio duration; lower is faster);
- throughput of `--concurrency` transcriptions of that file at once (audio seconds per second):
  our server batches them on its engine; faster-whisper runs them on a thread pool over one
  `WhisperModel` (CTranslate2 batches nothing across calls, so threads are its way to overlap).

Both decode greedily (faster-whisper: `beam_size=1`, `without_timestamps=True`, no VAD,
temperature 0 only) with `--threads` CPU threads each; the texts are printed so a reader can see
they agree. faster-whisper reads the CTranslate2 folder our loader reads (`engine.wheel_whisper`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai

from bench.report import append_section, command_line, markdown_table
from bench.server_process import ServerProcess

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Meeting notes are shared with every member of the team after the call.",
    "Please remember to bring your umbrella because it might rain later today.",
    "The train to the airport leaves every twenty minutes from platform four.",
    "Our quarterly results were better than we expected in every region.",
    "She opened the window and listened to the birds singing in the garden.",
    "The new library will open next spring with a large section for children.",
    "He asked the waiter for a glass of water and the menu of the day.",
]


def speech(seconds: float, folder: Path) -> Path:
    """A 16 kHz mono WAV of at least `seconds` of English speech (espeak-ng), cut to `seconds`."""
    text = " ".join(SENTENCES)
    pieces: list[np.ndarray] = []
    total = 0
    while total < seconds * 16000:
        out = folder / f"part{len(pieces)}.wav"
        subprocess.run(["espeak-ng", "-w", str(out), "-s", "160", text], check=True)
        with wave.open(str(out)) as source:
            rate = source.getframerate()
            samples = np.frombuffer(source.readframes(source.getnframes()), dtype="<i2")
        resampled = np.interp(np.arange(0, len(samples), rate / 16000), np.arange(len(samples)), samples)
        pieces.append(resampled.astype("<i2"))
        total += len(resampled)
    joined = np.concatenate(pieces)[: int(seconds * 16000)]
    path = folder / f"speech-{seconds:g}s.wav"
    with wave.open(str(path), "wb") as sink:
        sink.setnchannels(1)
        sink.setsampwidth(2)
        sink.setframerate(16000)
        sink.writeframes(joined.tobytes())
    return path


async def ours(base_url: str, model: str, audio: Path, concurrency: int) -> tuple[float, float, str]:
    """(one file's seconds, `concurrency` files' seconds, the text) through the openai client."""
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=3600) as client:

        async def one() -> str:
            with audio.open("rb") as file:
                result = await client.audio.transcriptions.create(model=model, file=file, temperature=0.0)
            return result.text

        await one()  # warm-up (first shapes)
        started = time.perf_counter()
        text = await one()
        single = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        return single, time.perf_counter() - started, text


def faster_whisper(
    folder: Path, audio: Path, concurrency: int, threads: int, compute_type: str
) -> tuple[float, float, str]:
    from faster_whisper import WhisperModel

    model = WhisperModel(
        str(folder), device="cpu", compute_type=compute_type, cpu_threads=threads, num_workers=concurrency
    )

    def one() -> str:
        segments, _ = model.transcribe(
            str(audio), beam_size=1, without_timestamps=True, vad_filter=False, temperature=0.0,
            condition_on_previous_text=False,
        )  # fmt: skip
        return "".join(segment.text for segment in segments).strip()

    one()
    started = time.perf_counter()
    text = one()
    single = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: one(), range(concurrency)))
    return single, time.perf_counter() - started, text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compute-type",
        default="default",
        help="faster-whisper's compute type: default (the weights' float16, run as float32 on a CPU without "
        "fast float16) or int8, which CTranslate2 users often pick on CPUs",
    )
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    from engine import fetch_whisper, whisper_ct2_folder  # fetched once into the cache

    fetch_whisper(args.model)
    folder = whisper_ct2_folder(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        audio = speech(args.seconds, Path(tmp))
        rows: dict[str, list[tuple[float, float]]] = {"sansllm": [], "faster-whisper": []}
        texts: dict[str, str] = {}
        for _ in range(args.rounds):  # alternate, one system at a time
            print("[bench] faster-whisper", file=sys.stderr, flush=True)
            single, batch, texts["faster-whisper"] = faster_whisper(
                folder, audio, args.concurrency, args.threads, args.compute_type
            )
            rows["faster-whisper"].append((single, batch))
            print("[bench] sansllm", file=sys.stderr, flush=True)
            with ServerProcess(args.model, ["--max-num-seqs", str(4 * args.concurrency)]) as server:
                single, batch, texts["sansllm"] = asyncio.run(ours(server.base_url, args.model, audio, args.concurrency))
            rows["sansllm"].append((single, batch))
    table = []
    for name, runs in rows.items():
        single = statistics.median(run[0] for run in runs)
        batch = statistics.median(run[1] for run in runs)
        table.append([name, f"{single / args.seconds:.3f}", f"{args.concurrency * args.seconds / batch:.1f}",
                      ", ".join(f"{s / args.seconds:.3f}" for s, _ in runs)])  # fmt: skip
    body = markdown_table(
        ["system", f"RTF, one {args.seconds:g} s file (median)", f"audio s per s, {args.concurrency} at once (median)",
         "RTF per round"],
        table,
    )  # fmt: skip
    body += "\n\nTexts (last round):\n\n" + "\n".join(f"- {name}: {text}" for name, text in texts.items())
    print(body)
    if args.record:
        append_section(
            f"Speech to text: {args.model} vs faster-whisper (issue 13)",
            command_line("bench.transcription", argv or sys.argv[1:]),
            f"{args.threads} CPU threads each; greedy; one system at a time; {args.rounds} alternating rounds; "
            f"faster-whisper compute_type={args.compute_type}",
            body,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
