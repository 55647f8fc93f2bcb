"""Speculative decoding (n-gram prompt lookup) on and off, same engine, same prompts, same process kind.

    .venv/bin/python -m bench.spec_decode [--streams 1,32] [--workloads repeat,plain] [--output-len 128]
        [--input-len 150,200] [--speculative-config JSON] [--record]

Two workloads, chat-templated for the default model (SmolLM2-135M-Instruct), greedy with
ignore_eos and exactly `--output-len` tokens each (as bench.throughput):
- `repeat`: "Repeat the following text exactly" + a passage, or a small code file to edit, so the
  output repeats the prompt and n-gram drafts are often right;
- `plain`: questions about a passage that call for new text, where drafts rarely match.

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

DEFAULT_SPEC = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 4,
    "prompt_lookup_min": 2,
}
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
    summaries: dict[str, Summary]
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def speedup(self) -> float:
        return ratio(self.summaries["on"].output_tok_s, self.summaries["off"].output_tok_s)


def make_workload(
    tokenizer: HFTokenizer, name: str, count: int, input_len: tuple[int, int]
) -> list[list[int]]:
    """`count` chat prompts of the workload, passages cut from the corpus at different words."""
    words = CORPUS.split()
    asks = REPEAT_ASKS if name == "repeat" else PLAIN_ASKS
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
    by_variant = {}
    for variant in ("off", "on"):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            by_variant[variant] = pool.submit(_run_variant, variant, args, model, workloads).result()
    rows = []
    for name in args.workloads:
        for streams in args.streams:
            drafts, drafted, accepted = by_variant["on"][name, streams][1]
            summaries = {variant: by_variant[variant][name, streams][0] for variant in ("off", "on")}
            rows.append(Row(name, streams, summaries, drafts, drafted, accepted))
    return rows


def render(args: argparse.Namespace, rows: list[Row]) -> str:
    lo, hi = args.input_len
    headers = ["workload", "streams", "requests", "off tok/s", "on tok/s", "on/off", "drafts",
               "acceptance", "accepted per draft", "on ITL p50 ms", "off ITL p50 ms"]  # fmt: skip
    table = [
        [
            row.workload, str(row.streams), str(row.summaries["on"].requests),
            fmt(row.summaries["off"].output_tok_s), fmt(row.summaries["on"].output_tok_s), fmt(row.speedup, 2),
            str(row.drafts), fmt(row.accepted_tokens / row.draft_tokens if row.draft_tokens else float("nan"), 2),
            fmt(row.accepted_tokens / row.drafts if row.drafts else float("nan"), 2),
            fmt(row.summaries["on"].itl_p50 * 1000), fmt(row.summaries["off"].itl_p50 * 1000),
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
        f"Model `{resolve_model(args.model)}` ({args.dtype}), greedy, ignore_eos, {args.output_len} output tokens "
        f"per request, prompts of ~{lo}-{hi} passage words in a chat template; speculation: "
        f"`{json.dumps(args.speculative_config)}`.",
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
        "--workloads", type=lambda v: [p for p in v.split(",") if p], default=["repeat", "plain"]
    )
    parser.add_argument(
        "--min-prompts", type=int, default=4, help="prompts per run at least (1 stream runs them one by one)"
    )
    parser.add_argument(
        "--input-len", type=parse_range, default=(150, 200), help="passage words, N or LOW,HIGH"
    )
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--speculative-config", type=json.loads, default=DEFAULT_SPEC)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--results", default=str(RESULTS_PATH))
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    unknown = set(args.workloads) - {"repeat", "plain"}
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
