"""Reports how many requests the fuzz properties exercised, so the figure is visible in every run."""

from __future__ import annotations

from typing import Any

from fuzz import harness


def pytest_terminal_summary(terminalreporter: Any) -> None:
    total = sum(harness.EXERCISED.values())
    if not total:
        return
    families = ", ".join(f"{name} {count}" for name, count in sorted(harness.EXERCISED.items()))
    statuses = ", ".join(f"{status}: {count}" for status, count in sorted(harness.STATUSES.items()))
    terminalreporter.write_line(f"fuzz: {total} requests exercised ({families}); statuses {statuses}")
    media = sum(harness.MEDIA.values())
    if media:
        by_status = ", ".join(f"{status}: {count}" for status, count in sorted(harness.MEDIA.items()))
        fetches = ", ".join(f"{kind} {count}" for kind, count in sorted(harness.FETCHES.items())) or "none"
        terminalreporter.write_line(
            f"fuzz: {media} requests with media parts (statuses {by_status}); URLs fetched: {fetches}"
        )
