"""Embeddings throughput: concurrent clients on `/v1/embeddings` against sentence-transformers' `encode`.

    .venv/bin/python -m bench.embeddings [--num-sentences 1000] [--concurrency 8]
                                         [--inputs-per-request 1,32] [--repeats 3] [--profile DIR]
                                         [--record]

Builds a deterministic set of English sentences of mixed length (a retrieval mix: short queries,
medium passages, a tail of long ones), then, in one run:

1. sentence-transformers' `SentenceTransformer(folder, device="cpu").encode(sentences)` with its
   default batching (batch size 32, length-sorted), in this process, `--repeats` times **before
   our server starts**, with the torch thread count the server uses;
2. `sansllm serve` in a subprocess, and C clients that each send their next request when the last
   one is answered, every request carrying `--inputs-per-request` sentences: `--repeats` passes
   per value given;
3. the baseline's passes again, **after the server stopped**: the two never compete for the CPU,
   and a baseline measured on both sides of the server's passes sees the same machine.

Embeddings/s is sentences over the wall clock from the first send to the last answer (for the
baseline: the `encode` call); ratios are given best to best and median to median. Every vector
the server returns is checked against the baseline's: the largest cosine distance is reported, and
the run fails above `--max-cosine-distance`. `--profile DIR` attaches py-spy to the server during
the first pass of each value and says where its time went (see bench/py_spy.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import math
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np

from bench.report import (
    RESULTS_PATH,
    append_section,
    command_line,
    cpu_flags,
    cpu_model,
    fmt,
    markdown_table,
    ms,
)
from bench.server_process import ServerProcess
from bench.stats import percentile, ratio

BASELINE = "sentence-transformers encode"
OURS = "sansllm /v1/embeddings"
TARGET_RATIO = 1.5
REQUEST_TIMEOUT_S = 600.0

# Written for this benchmark: sentences are cut from this text (and bench.prompts' CORPUS), so
# there is no licence question and the vocabulary is ordinary English prose.
RETRIEVAL_TEXT = """\
How do I reset my password if I no longer have access to the email address on my account? Open
the sign-in page, choose the link for a forgotten password, and follow the steps to confirm your
identity with a phone number or a recovery code. Train tickets can be refunded up to one hour
before departure, minus a small fee, and season tickets are refunded for every full week that
remains. The museum is open every day except Monday, and entry to the permanent collection is
free for children under twelve. Solar panels produce less power in winter, but a clean panel
facing south can still cover a good share of a small household's daily use. To keep bread fresh
for longer, store it in a cloth bag at room temperature rather than in the refrigerator, which
dries it out. The river flooded twice last decade, and the council has since raised the
embankment and planted willows along the lower meadows to slow the water. Which laptop is best
for students who write long essays and travel often? A light machine with a good keyboard and a
battery that lasts a full day matters more than a fast processor. Vaccines train the immune
system to recognise a germ without causing the illness, so that the body can respond quickly
when it meets the real thing. The recipe needs two cups of flour, a pinch of salt, one egg and
enough warm milk to make a smooth batter; rest it for half an hour before cooking. Our support
team answers messages within one working day, and urgent problems with payments are handled by
phone around the clock. Photosynthesis turns light, water and carbon dioxide into sugar and
oxygen, and it takes place in the chloroplasts of green plant cells. The contract may be
cancelled by either party with thirty days' written notice, and any prepaid fees for the
remaining period will be returned within two weeks. Cheap flights to the coast in early spring
usually leave midweek, and prices rise quickly once the school holidays are announced.
"""

# (share of the sentences, fewest words, most words): short queries, passages, long passages.
LENGTH_MIX = ((0.4, 4, 16), (0.4, 17, 60), (0.2, 61, 120))


def sentence_words() -> list[str]:
    from bench.prompts import CORPUS  # the serving benchmark's prose: more varied vocabulary

    return (RETRIEVAL_TEXT + " " + CORPUS).split()


def make_sentences(num: int, seed: int = 0, mix: Sequence[tuple[float, int, int]] = LENGTH_MIX) -> list[str]:
    """`num` distinct sentences of mixed length (words per `mix`), the same for the same arguments.

    Each is a run of consecutive words from a random position of the text (wrapping around),
    capitalised and ending in a full stop.
    """
    words = sentence_words()
    rng = random.Random(seed)
    weights = [share for share, _, _ in mix]
    sentences: list[str] = []
    seen: set[str] = set()
    while len(sentences) < num:
        _, low, high = rng.choices(mix, weights)[0]
        length, start = rng.randint(low, high), rng.randrange(len(words))
        text = " ".join(words[(start + i) % len(words)] for i in range(length)).rstrip(",;:")
        text = text[0].upper() + text[1:]
        if not text.endswith((".", "?", "!")):
            text += "."
        if text not in seen:
            seen.add(text)
            sentences.append(text)
    return sentences


# ---- the baseline: sentence-transformers in this process ----


class Timed(msgspec.Struct, kw_only=True):
    """One timed pass over all sentences."""

    elapsed: float
    load: tuple[float, float]  # the machine's 1-minute load average before and after


class Baseline:
    """sentence-transformers in this process: `SentenceTransformer(folder, device="cpu").encode`
    with its defaults (batch size 32, sentences sorted by length within the call), float32 numpy out."""

    def __init__(self, folder: str, dtype: str, warmup: Sequence[str]) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        kwargs = {} if dtype == "float32" else {"model_kwargs": {"dtype": getattr(torch, dtype)}}
        self.model = SentenceTransformer(folder, device="cpu", **kwargs)
        self.batch_size = int(inspect.signature(self.model.encode).parameters["batch_size"].default)
        self.threads = torch.get_num_threads()
        self.model.encode(list(warmup))
        self.vectors: np.ndarray | None = None  # from the first pass
        self.passes: list[Timed] = []

    def run(self, sentences: Sequence[str]) -> None:
        load_before = _load()
        begin = time.perf_counter()
        vectors = self.model.encode(list(sentences))  # the defaults: that is the baseline
        elapsed = time.perf_counter() - begin
        self.passes.append(Timed(elapsed=elapsed, load=(load_before, _load())))
        if self.vectors is None:
            self.vectors = np.asarray(vectors, dtype=np.float32)


# ---- our server: C clients over HTTP ----


class _Item(msgspec.Struct):
    index: int
    embedding: list[float] | str


class _Reply(msgspec.Struct):
    data: list[_Item]


_decode_reply = msgspec.json.Decoder(_Reply).decode


class ServerRun(msgspec.Struct, kw_only=True):
    """One timed pass of the clients over all sentences."""

    inputs_per_request: int
    concurrency: int
    vectors: np.ndarray
    elapsed: float  # first send to last answer
    latencies: list[float]  # per request, send to answer
    load: tuple[float, float]  # the machine's 1-minute load average before and after
    client_cpu_s: float = math.nan  # CPU seconds of this process (the clients) during the pass
    server_cpu_s: float = math.nan  # CPU seconds of the server process during the pass (when we started it)
    profile: dict[str, float] | None = None  # seconds per part of the server (py-spy), with --profile


def _vector(embedding: list[float] | str) -> np.ndarray:
    if isinstance(embedding, str):  # base64 of little-endian float32
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


async def embed_all(
    base_url: str,
    model: str,
    sentences: Sequence[str],
    concurrency: int,
    inputs_per_request: int,
    encoding_format: str = "float",
) -> ServerRun:
    """Every sentence through POST /v1/embeddings: `concurrency` clients, each sending its next
    request (the next `inputs_per_request` sentences) as soon as its last one is answered."""
    import httpx

    chunks = [
        list(sentences[i : i + inputs_per_request]) for i in range(0, len(sentences), inputs_per_request)
    ]
    vectors: list[np.ndarray | None] = [None] * len(sentences)
    latencies: list[float] = []
    pending = iter(range(len(chunks)))  # shared: each client takes the next request
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}

    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def one_client() -> None:
            for number in pending:
                body = {"model": model, "input": chunks[number], "encoding_format": encoding_format}
                sent = time.perf_counter()
                response = await client.post(
                    "/v1/embeddings", content=msgspec.json.encode(body), headers=headers
                )
                latencies.append(time.perf_counter() - sent)
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.content[:500]!r}")
                items = _decode_reply(response.content).data
                if sorted(item.index for item in items) != list(range(len(chunks[number]))):
                    raise RuntimeError(f"request {number}: answer indices {[i.index for i in items]}")
                for item in items:
                    vectors[number * inputs_per_request + item.index] = _vector(item.embedding)

        load_before, cpu_before = _load(), time.process_time()
        begin = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - begin
        client_cpu = time.process_time() - cpu_before
    return ServerRun(
        inputs_per_request=inputs_per_request,
        concurrency=concurrency,
        vectors=np.stack(vectors),  # type: ignore[arg-type]
        elapsed=elapsed,
        latencies=latencies,
        load=(load_before, _load()),
        client_cpu_s=client_cpu,
    )


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def max_cosine_distance(ours: np.ndarray, reference: np.ndarray) -> float:
    """The largest 1 - cos(a, b) over matching rows, computed in float64."""
    a, b = ours.astype(np.float64), reference.astype(np.float64)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.max(1.0 - cos))


# ---- the run ----


def parse_counts(value: str) -> list[int]:
    """'1' -> [1]; '1,32' -> [1, 32]. For argparse."""
    counts = [int(part) for part in value.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"bad list {value!r}: need positive integers")
    return counts


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from engine import DEFAULT_EMBEDDING_MODEL

    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default=DEFAULT_EMBEDDING_MODEL,
        help=f"name or HF folder (default {DEFAULT_EMBEDDING_MODEL})",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="both sides use it"
    )
    parser.add_argument("--num-sentences", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=8, help="clients, each with one request in flight")
    parser.add_argument(
        "--inputs-per-request", type=parse_counts, default=[1],
        help="sentences per request; a list (1,32) runs once per value against the same server",
    )  # fmt: skip
    parser.add_argument("--encoding-format", choices=["float", "base64"], default="float")
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="timed passes of each: the baseline's before the server starts and again after it stops, "
        "the server's per --inputs-per-request value; best and median are reported",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads on both sides (default: torch's default, which `sansllm serve` keeps)",
    )  # fmt: skip
    parser.add_argument(
        "--max-cosine-distance", type=float, default=None,
        help="fail above this (default 1e-5 in float32, 1e-2 in bfloat16)",
    )  # fmt: skip
    parser.add_argument("--base-url", default=None, help="use a running server instead of starting one")
    parser.add_argument(
        "--server-args", default="", help="extra `sansllm serve` flags, one shell-quoted string"
    )
    parser.add_argument(
        "--profile", default=None, metavar="DIR",
        help="py-spy the server during the first pass of each --inputs-per-request value: raw stacks "
        "into DIR, and a table of where the server's time goes",
    )  # fmt: skip
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--results", default=str(RESULTS_PATH), help="file --record appends to")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. 'machine busy')")
    args = parser.parse_args(argv)
    if args.max_cosine_distance is None:
        args.max_cosine_distance = 1e-5 if args.dtype == "float32" else 1e-2
    return args


class EmbeddingsResult(msgspec.Struct, kw_only=True):
    sentences: int
    words: tuple[int, int, float]  # min, max, mean per sentence
    tokens: tuple[int, int, float] | None  # the same in model tokens (with [CLS] and [SEP])
    threads: int
    batch_size: int  # sentence-transformers' default
    baseline: list[Timed]  # every pass: `baseline_before` of them before the server started, the rest after
    baseline_before: int
    runs: list[list[ServerRun]]  # per value of --inputs-per-request, every pass
    distances: list[float]  # per value of --inputs-per-request: max cosine distance over its passes
    cpu: str
    flags: list[str]

    def baseline_rate(self, pick: str) -> float:
        return self.sentences / _pick(pick, [p.elapsed for p in self.baseline])

    def rate(self, passes: list[ServerRun], pick: str) -> float:
        return self.sentences / _pick(pick, [p.elapsed for p in passes])

    def speedup(self, passes: list[ServerRun], pick: str) -> float:
        return ratio(self.rate(passes, pick), self.baseline_rate(pick))


def _pick(pick: str, elapsed: list[float]) -> float:
    return min(elapsed) if pick == "best" else statistics.median(elapsed)


def _token_counts(folder: str, sentences: Sequence[str]) -> tuple[int, int, float] | None:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # all-MiniLM-L6-v2's tokenizer.json pads to 128: count the real tokens
    tokenizer.no_truncation()
    counts = [len(e.ids) for e in tokenizer.encode_batch(list(sentences))]
    return min(counts), max(counts), sum(counts) / len(counts)


async def _measured_run(
    args: argparse.Namespace,
    base_url: str,
    sentences: Sequence[str],
    count: int,
    pid: int | None,
    profile: Path | None,
) -> ServerRun:
    """One timed pass over all sentences; the server's CPU seconds and (`profile`) its py-spy profile."""
    from bench.py_spy import Profiler, process_cpu_seconds, summarize

    def go():
        return embed_all(base_url, args.model, sentences, args.concurrency, count, args.encoding_format)

    cpu_before = process_cpu_seconds(pid) if pid else None
    if profile is not None and pid:
        with Profiler(pid, profile, args.profile_rate):
            result = await go()
        result.profile = summarize(profile, args.profile_rate)
    else:
        result = await go()
    cpu_after = process_cpu_seconds(pid) if pid else None
    if cpu_before is not None and cpu_after is not None:
        result.server_cpu_s = cpu_after - cpu_before
    return result


def run(args: argparse.Namespace) -> EmbeddingsResult:
    """Baseline passes, our server's passes (every value of --inputs-per-request in turn, repeated),
    then, with the server stopped, the baseline's passes again."""
    from engine import resolve_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the baseline loads a local folder: never the hub
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server's torch default follows it
    folder = str(resolve_model(args.model).path)
    sentences = make_sentences(args.num_sentences, seed=args.seed)
    warmup = make_sentences(64, seed=args.seed + 1_000_003)
    words = [len(s.split()) for s in sentences]

    def baseline_passes(when: str) -> None:
        for _ in range(args.repeats):
            print(f"[baseline] sentence-transformers, {when}", file=sys.stderr, flush=True)
            baseline.run(sentences)

    baseline = Baseline(folder, args.dtype, warmup)
    baseline_passes("before the server starts")

    async def serve_all(base_url: str, pid: int | None = None) -> list[list[ServerRun]]:
        await embed_all(base_url, args.model, warmup, args.concurrency, 1, args.encoding_format)
        runs: list[list[ServerRun]] = [[] for _ in args.inputs_per_request]
        for repeat in range(args.repeats):
            for passes, count in zip(runs, args.inputs_per_request, strict=True):
                print(
                    f"[ours] pass {repeat + 1}: {len(sentences)} sentences, {count} per request, "
                    f"{args.concurrency} clients",
                    file=sys.stderr,
                    flush=True,
                )
                profile = None
                if args.profile and repeat == 0:
                    profile = Path(args.profile) / f"embeddings-{count}-per-request.txt"
                passes.append(await _measured_run(args, base_url, sentences, count, pid, profile))
        return runs

    if args.base_url:
        runs = asyncio.run(serve_all(args.base_url))
    else:
        server_args = ["--dtype", args.dtype, *shlex.split(args.server_args)]
        with ServerProcess(args.model, server_args) as server:
            runs = asyncio.run(serve_all(server.base_url, server.pid))
    baseline_passes("after the server stopped" if not args.base_url else "again")
    assert baseline.vectors is not None
    return EmbeddingsResult(
        sentences=len(sentences),
        words=(min(words), max(words), sum(words) / len(words)),
        tokens=_token_counts(folder, sentences),
        threads=baseline.threads,
        batch_size=baseline.batch_size,
        baseline=baseline.passes,
        baseline_before=args.repeats,
        runs=runs,
        distances=[max(max_cosine_distance(p.vectors, baseline.vectors) for p in passes) for passes in runs],
        cpu=cpu_model(),
        flags=cpu_flags(),
    )


PASS_HEADERS = (
    "backend", "pass", "sentences per request", "requests", "elapsed s", "embeddings/s",
    "request p50 ms", "request p99 ms", "server CPU s", "client CPU s", "load avg",
)  # fmt: skip
SUMMARY_HEADERS = (
    "backend", "sentences per request", "passes", "best embeddings/s", "median embeddings/s",
    "ratio (best)", "ratio (median)", "max cosine distance",
)  # fmt: skip


def _load_cell(load: tuple[float, float]) -> str:
    return f"{load[0]:.1f} -> {load[1]:.1f}"


def _cpu_cell(seconds: float) -> str:
    return "-" if math.isnan(seconds) else fmt(seconds)


def render(args: argparse.Namespace, result: EmbeddingsResult) -> str:
    lo_w, hi_w, mean_w = result.words
    tokens = ""
    if result.tokens:
        lo_t, hi_t, mean_t = result.tokens
        tokens = f" ({lo_t}-{hi_t} tokens, mean {mean_t:.1f})"
    baseline_name = f"{BASELINE} (batch {result.batch_size})"
    server_place = f"at {args.base_url}" if args.base_url else "started after the first baseline passes"
    after = "again" if args.base_url else "after stopping the server"
    blocks = [
        f"Model `{args.model}` ({args.dtype}); {result.sentences} English sentences of {lo_w}-{hi_w} words "
        f"(mean {mean_w:.1f}){tokens}, seed {args.seed}. Baseline: `SentenceTransformer(folder, "
        f'device="cpu").encode(sentences)` with its default batching, in the benchmark process, '
        f"{result.baseline_before} passes before our server runs and {len(result.baseline) - result.baseline_before} "
        f"{after} (never beside it). Our server {server_place}: {args.concurrency} clients, each sending "
        "its next request when its last is answered; embeddings/s is sentences over the wall clock "
        f"from the first send to the last answer. torch threads: {result.threads} on both sides "
        "(`sansllm serve` keeps torch's default). Encoding format: "
        f"{args.encoding_format}. Load avg: the machine's 1-minute load average before -> after a pass.",
        f"CPU: {result.cpu}, {os.cpu_count()} cores; flags: {' '.join(result.flags) or 'n/a'}",
    ]
    rows = []
    for number, timed in enumerate(result.baseline):
        label = f"{number + 1} ({'before' if number < result.baseline_before else 'after'})"
        rows.append([baseline_name, label, "-", "-", fmt(timed.elapsed, 2), fmt(result.sentences / timed.elapsed),
                     "-", "-", "-", "-", _load_cell(timed.load)])  # fmt: skip
    for passes in result.runs:
        for number, pass_ in enumerate(passes):
            label = str(number + 1) + (" (py-spy)" if pass_.profile is not None else "")
            rows.append(
                [OURS, label, str(pass_.inputs_per_request), str(len(pass_.latencies)), fmt(pass_.elapsed, 2),
                 fmt(result.sentences / pass_.elapsed), ms(percentile(pass_.latencies, 50)),
                 ms(percentile(pass_.latencies, 99)), _cpu_cell(pass_.server_cpu_s),
                 _cpu_cell(pass_.client_cpu_s), _load_cell(pass_.load)]
            )  # fmt: skip
    blocks.append(markdown_table(PASS_HEADERS, rows))
    summary = [[baseline_name, "-", str(len(result.baseline)), fmt(result.baseline_rate("best")),
                fmt(result.baseline_rate("median")), "1", "1", "reference"]]  # fmt: skip
    for passes, distance in zip(result.runs, result.distances, strict=True):
        summary.append(
            [OURS, str(passes[0].inputs_per_request), str(len(passes)), fmt(result.rate(passes, "best")),
             fmt(result.rate(passes, "median")), fmt(result.speedup(passes, "best"), 2),
             fmt(result.speedup(passes, "median"), 2), f"{distance:.1e}"]
        )  # fmt: skip
    blocks.append(markdown_table(SUMMARY_HEADERS, summary))
    lines = []
    for passes, distance in zip(result.runs, result.distances, strict=True):
        median, best = result.speedup(passes, "median"), result.speedup(passes, "best")
        verdict = "PASS" if median >= TARGET_RATIO else "FAIL"
        lines.append(
            f"- embeddings/s, sansllm ({passes[0].inputs_per_request} per request, {args.concurrency} clients) "
            f"/ sentence-transformers: x{fmt(median, 2)} median to median, x{fmt(best, 2)} best to best "
            f"(target >= {TARGET_RATIO}: {verdict}); max cosine distance {distance:.1e} "
            f"(limit {args.max_cosine_distance:.0e})"
        )
    blocks.append("Ratios:\n\n" + "\n".join(lines))
    for passes in result.runs:
        for pass_ in passes:
            if pass_.profile is not None:
                blocks.append(render_profile(pass_))
    return "\n\n".join(blocks)


def render_profile(pass_: ServerRun) -> str:
    """Where the server's threads spent a pass (py-spy seconds per part, and the share of the pass)."""
    assert pass_.profile is not None
    rows = [
        [part, fmt(seconds, 2), fmt(100 * seconds / pass_.elapsed)] for part, seconds in pass_.profile.items()
    ]
    return (
        f"Server profile, {pass_.inputs_per_request} per request ({pass_.elapsed:.2f} s pass; py-spy seconds "
        "of each thread running or waiting for a core, so the engine thread and the event loop overlap):\n\n"
        + markdown_table(("part", "seconds", "% of the pass"), rows)
    )


def check(args: argparse.Namespace, result: EmbeddingsResult) -> None:
    worst = max(result.distances, default=0.0)
    if math.isnan(worst) or worst > args.max_cosine_distance:
        raise SystemExit(
            f"vectors differ from sentence-transformers: max cosine distance {worst:.2e} "
            f"> {args.max_cosine_distance:.0e}"
        )


def run_and_report(argv: Sequence[str]) -> tuple[EmbeddingsResult, str]:
    """Parse, run, print the table and (with --record) append it to the results file."""
    args = parse_args(argv)
    result = run(args)
    text = render(args, result)
    print(text)
    if args.record:
        append_section(
            "Embeddings", command_line("bench.embeddings", argv), args.note, text, Path(args.results)
        )
    check(args, result)
    return result, text


def main(argv: Sequence[str] | None = None) -> int:
    run_and_report(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
