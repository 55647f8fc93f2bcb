"""Does rejecting a wrong API key take longer the more of the key a guess gets right?

    .venv/bin/python -m bench.auth_timing [--repeats 200000] [--record]

Times the core's key check (`protocol.app.App._authorized`, the whole check a request goes
through) for wrong keys that share 0, half, and all but the last character with the real key, and
for the real key, interleaved in rounds so drift hits every case alike. The check compares SHA-256
digests with `hmac.compare_digest` over every configured key, so the medians should agree within
noise: a ratio far from 1 between prefix lengths would be a timing side channel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from bench.report import append_section, command_line, fmt, markdown_table
from protocol import App, AppConfig
from protocol.testing import tiny_served_model

KEY = "sk-" + "a1b2c3d4e5f6" * 4


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200_000, help="checks per case per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    app = App(AppConfig(api_keys=[KEY, "sk-other-key"]), [tiny_served_model()], clock=time.time, new_id=lambda: "x")
    cases = {
        "no character right": "X" * len(KEY),
        "half the key right": KEY[: len(KEY) // 2] + "X" * (len(KEY) - len(KEY) // 2),
        "all but the last right": KEY[:-1] + "X",
        "the right key": KEY,
    }
    headers = {name: f"Bearer {guess}".encode() for name, guess in cases.items()}
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, header in headers.items():
            check = app._authorized
            started = time.perf_counter_ns()
            for _ in range(args.repeats):
                check(header)
            timings[name].append((time.perf_counter_ns() - started) / args.repeats)
    baseline = statistics.median(timings["no character right"])
    rows = [
        [name, fmt(statistics.median(values), 1), fmt(statistics.median(values) / baseline, 3)]
        for name, values in timings.items()
    ]
    body = markdown_table(("guess", "ns per check (median of rounds)", "ratio to no character right"), rows)
    print(body)
    if args.record:
        command = command_line("bench.auth_timing", sys.argv[1:] if argv is None else list(argv))
        append_section("API key check: time against how much of the key a guess gets right", command, args.note, body)


if __name__ == "__main__":
    main()
