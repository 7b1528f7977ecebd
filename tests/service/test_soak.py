"""The short CI variant of the soak (`scripts/soak` runs a minute): mixed good and bad traffic
across the shipped models gives no wrong answer, no unexpected status and flat memory."""

from __future__ import annotations

from pathlib import Path

from tests.service.soak import run_against_a_server


def test_mixed_good_and_bad_traffic_loses_nothing_and_leaks_nothing(shipped_store: Path) -> None:
    report = run_against_a_server(shipped_store, seconds=8.0, clients=6)
    print("\n".join(report.lines()))
    assert report.good_ok > 100 and report.sent > 200
    assert report.wrong_answers == 0
    assert not report.unexpected, report.unexpected[:5]
    assert set(report.statuses) - {200} and all(code < 500 for code in report.statuses)
    # Warmed up first: steady traffic must not grow the process (a leak of 1 KiB per request
    # would show as several MiB here).
    assert report.rss_mib_after - report.rss_mib_before < 8.0
