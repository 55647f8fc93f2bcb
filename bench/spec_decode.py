"""Speculative decoding (n-gram prompt lookup) on and off, same engine, same prompts, same process kind.

    .venv/bin/python -m bench.spec_decode [--streams 1,32] [--workloads repeat,plain,sampled] [--output-len 128]
        [--input-len 150,200] [--speculative-config JSON] [--rounds N] [--record]

Three workloads, chat-templated for the default model (SmolLM2-135M-Instruct), with ignore_eos and
exactly `--output-len` tokens each (as bench.throughput):
- `repeat`: "Repeat the following text exactly" + a passage, or a small code file to edit, so the
  output repeats the prompt and n-gram drafts are often right (greedy);
- `plain`: questions about a passage that call for new text (greedy). A model this small often
  falls into loops of its own output under greedy decoding, which prompt lookup then drafts well;
- `sampled`: the `plain` prompts sampled at temperature 1.0 (seeded), so the text does not repeat
  and most drafts are rejected: the cost of speculating when it does not pay.

Each variant (speculation off, then on) runs in a fresh spawned process (one OpenMP team per
process, as bench.throughput explains), over the same prompts at each stream count (a closed
loop of that many requests in flight). Prints output tok/s for both, the ratio on/off, and the
acceptance counters of the engine (`EngineStats.spec_decode_*`), and checks the issue's targets:
repeat at 1 stream >= 1.5x, and no workload slower than 0.95x.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import msgspec
import torch

from bench.hf_baseline import HFTokenizer
from bench.model_files import concrete_dtype, resolve_model
from bench.prompts import CORPUS, parse_range
from bench.report import RESULTS_PATH, append_section, command_line, fmt, markdown_table
from bench.stats import Summary, ratio, summarize

# k = 7: a drafted sequence alone fills the 8 rows a drafted step may hold (`max_step_rows`), the
# most the CPU's multi-row GEMV takes in one pass (k = 4 gave 1.43x on `repeat` at 1 stream, 7 1.78x)
DEFAULT_SPEC = {
    "method": "ngram",
    "num_speculative_tokens": 7,
    "prompt_lookup_max": 4,
    "prompt_lookup_min": 2,
}
WORKLOADS = ("repeat", "plain", "sampled")
WORKLOAD_SAMPLING = {"sampled": {"temperature": 1.0, "seed": 1000}}  # others greedy
REPEAT_TARGET = 1.5  # on / off output tok/s, repeat workload, 1 stream
SLOWDOWN_LIMIT = 0.95  # on / off output tok/s, any other row

CODE = """\
def load_orders(path):
    orders = []
    with open(path) as handle:
        for line in handle:
            fields = line.strip().split(",")
            if len(fields) != 4:
                continue
            order_id, customer, amount, status = fields
            orders.append({"id": order_id, "customer": customer, "amount": float(amount), "status": status})
    return orders


def total_by_customer(orders):
    totals = {}
    for order in orders:
        if order["status"] != "paid":
            continue
        totals[order["customer"]] = totals.get(order["customer"], 0.0) + order["amount"]
    return totals
"""

REPEAT_ASKS = [
    "Repeat the following text exactly, word for word:\n\n{text}",
    "Rename the function total_by_customer to paid_totals everywhere and print the whole file:\n\n{code}",
    "Copy this passage without changing anything:\n\n{text}",
    "Add a docstring to each function and output the complete code:\n\n{code}",
]
PLAIN_ASKS = [
    "In your own words, what is this passage about, and what might happen next?\n\n{text}",
    "Write a short poem inspired by the following passage, without quoting it:\n\n{text}",
    "List five questions a reader might ask after reading this:\n\n{text}",
    "Describe the town in this passage as a travel guide would, in new sentences:\n\n{text}",
]


class Row(msgspec.Struct):
    workload: str
    streams: int
    rounds: list[dict[str, Summary]]  # per round: "off" and "on"
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    def median(self, variant: str, field: str) -> float:
        return statistics.median(getattr(r[variant], field) for r in self.rounds)

    @property
    def speedups(self) -> list[float]:
        return [ratio(r["on"].output_tok_s, r["off"].output_tok_s) for r in self.rounds]

    @property
    def speedup(self) -> float:
        """The median of the rounds' on/off ratios (each round runs both, in alternating order)."""
        return statistics.median(self.speedups)


def make_workload(
    tokenizer: HFTokenizer, name: str, count: int, input_len: tuple[int, int]
) -> list[list[int]]:
    """`count` chat prompts of the workload, passages cut from the corpus at different words."""
    words = CORPUS.split()
    asks = REPEAT_ASKS if name == "repeat" else PLAIN_ASKS  # `sampled` samples the plain asks
    prompts = []
    for i in range(count):
        start = (i * 37) % len(words)
        text = " ".join(
            (words[start:] + words[:start])[
                : input_len[0] * 3 // 4 + (i * 11) % (input_len[1] - input_len[0] + 1)
            ]
        )
        content = asks[i % len(asks)].format(text=text, code=CODE)
        rendered = tokenizer.hf.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        prompts.append(list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered))
    return prompts


def _run_variant(variant: str, args: argparse.Namespace, model: str, workloads: dict) -> dict:
    """One engine (speculation off or on) over every workload and stream count, in its own process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.engine_runner import EngineRunner  # deferred: importing the engine loads torch code

    options = {"max_num_seqs": max(args.streams), "progress": False, "num_threads": torch.get_num_threads()}
    if variant == "on":
        options["speculative_config"] = args.speculative_config
    runner = EngineRunner(model, args.dtype, **options)
    results = {}
    try:
        runner.warmup(workloads[args.workloads[0]][1][0])
        for name in args.workloads:
            for streams in args.streams:
                prompts = workloads[name][streams]
                print(
                    f"[{variant}] {name}, {streams} streams: {len(prompts)} prompts",
                    file=sys.stderr,
                    flush=True,
                )
                runner.sampling = WORKLOAD_SAMPLING.get(name, {})
                before = runner.engine.stats()
                timings = runner.run(prompts, [args.output_len] * len(prompts), streams)
                after = runner.engine.stats()
                counters = tuple(
                    getattr(after, f, 0) - getattr(before, f, 0)
                    for f in (
                        "spec_decode_num_drafts",
                        "spec_decode_num_draft_tokens",
                        "spec_decode_num_accepted_tokens",
                    )
                )
                results[name, streams] = (summarize(variant, timings), counters)
    finally:
        runner.close()
    return results


def run(args: argparse.Namespace) -> list[Row]:
    model = resolve_model(args.model)
    tokenizer = HFTokenizer(model)
    workloads = {
        name: {
            streams: make_workload(tokenizer, name, max(streams, args.min_prompts), args.input_len)
            for streams in sorted({1, *args.streams})
        }
        for name in args.workloads
    }
    rounds = []
    for number in range(args.rounds):
        # alternate which variant goes first, so a machine that drifts favours neither
        order = ("off", "on") if number % 2 == 0 else ("on", "off")
        by_variant = {}
        for variant in order:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                by_variant[variant] = pool.submit(_run_variant, variant, args, model, workloads).result()
        rounds.append(by_variant)
    rows = []
    for name in args.workloads:
        for streams in args.streams:
            counters = [r["on"][name, streams][1] for r in rounds]
            drafts, drafted, accepted = (sum(c[i] for c in counters) for i in range(3))
            summaries = [{v: r[v][name, streams][0] for v in ("off", "on")} for r in rounds]
            rows.append(Row(name, streams, summaries, drafts, drafted, accepted))
    return rows


def render(args: argparse.Namespace, rows: list[Row]) -> str:
    lo, hi = args.input_len
    headers = ["workload", "streams", "requests", "off tok/s", "on tok/s", "on/off", "on/off per round",
               "drafts", "acceptance", "accepted per draft", "on ITL p50 ms", "off ITL p50 ms"]  # fmt: skip
    table = [
        [
            row.workload, str(row.streams), str(row.rounds[0]["on"].requests),
            fmt(row.median("off", "output_tok_s")), fmt(row.median("on", "output_tok_s")), fmt(row.speedup, 2),
            " ".join(fmt(v, 2) for v in row.speedups),
            str(row.drafts), fmt(row.accepted_tokens / row.draft_tokens if row.draft_tokens else float("nan"), 2),
            fmt(row.accepted_tokens / row.drafts if row.drafts else float("nan"), 2),
            fmt(row.median("on", "itl_p50") * 1000), fmt(row.median("off", "itl_p50") * 1000),
        ]
        for row in rows
    ]  # fmt: skip
    checks = []
    for row in rows:
        if row.workload == "repeat" and row.streams == 1:
            target, what = REPEAT_TARGET, f">= {REPEAT_TARGET}x"
        else:
            target, what = SLOWDOWN_LIMIT, f">= {SLOWDOWN_LIMIT}x (at most 5% slower)"
        verdict = "PASS" if row.speedup >= target else "FAIL"
        checks.append(
            f"- {row.workload} at {row.streams} stream(s): on/off {fmt(row.speedup, 2)}, {what}: {verdict}"
        )
    return "\n\n".join([
        f"Model `{resolve_model(args.model)}` ({args.dtype}), greedy (`sampled`: temperature 1.0, seeded), ignore_eos, {args.output_len} output tokens "
        f"per request, prompts of ~{lo}-{hi} passage words in a chat template; speculation: "
        f"`{json.dumps(args.speculative_config)}`. {args.rounds} round(s), each running both variants in "
        "fresh processes in alternating order; tok/s and ITL are medians over rounds, on/off the median of "
        "the rounds' ratios.",
        markdown_table(headers, table),
        "\n".join(checks),
    ])  # fmt: skip


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.spec_decode", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--streams", type=lambda v: [int(p) for p in v.split(",") if p], default=[1, 32])
    parser.add_argument(
        "--workloads", type=lambda v: [p for p in v.split(",") if p], default=list(WORKLOADS)
    )
    parser.add_argument(
        "--min-prompts", type=int, default=4, help="prompts per run at least (1 stream runs them one by one)"
    )
    parser.add_argument(
        "--input-len", type=parse_range, default=(150, 200), help="passage words, N or LOW,HIGH"
    )
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--speculative-config", type=json.loads, default=DEFAULT_SPEC)
    parser.add_argument(
        "--rounds", type=int, default=1, help="off/on pairs, alternating order (32 streams drift ~10%%)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--results", default=str(RESULTS_PATH))
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    args.dtype = concrete_dtype(args.dtype)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    body = render(args, run(args))
    title = "Speculative decoding (n-gram), on vs off"
    print(body)
    if args.record:
        from pathlib import Path

        append_section(title, command_line("bench.spec_decode", argv), args.note, body, Path(args.results))


if __name__ == "__main__":
    main()
