"""Markdown for stdout (and docs/performance.md): tables of rows, rounds, overload, targets."""

from __future__ import annotations

import json
from typing import Any

from load.paired import LEVELS
from load.target_table import fmt, ratio
from load.wrk import Measurement


def results_table(ms: list[Measurement], ort: dict[str, dict[str, float]]) -> str:
    by = {(m.server, m.case, m.concurrency): m for m in ms}
    lines = [
        "| server | case | c | req/s | samples/s | p50 ms | p99 ms | errors | vs bare req/s "
        "| vs in-process ORT samples/s | wrk CPU | server CPU | server CPU us/req | other CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in ms:
        bare = by.get(("bare", f"mlpx{m.samples_per_request}", m.concurrency))
        ref = ort.get(f"{m.model}/batch{m.samples_per_request}", {}).get("samples_per_s")
        lines.append(
            f"| {m.server} | {m.case} | {m.concurrency} | {m.requests_per_s:,.0f} | "
            f"{m.samples_per_s:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {m.errors} | "
            f"{fmt(ratio(m.requests_per_s, bare.requests_per_s if bare else None))} | "
            f"{fmt(ratio(m.samples_per_s, ref), '.3f')} | {m.wrk_cpu_cores:.2f} | "
            f"{m.server_cpu_cores:.2f} | {m.cpu_us_per_request:.0f} | {m.other_cpu_cores:.2f} |"
        )
    return "\n".join(lines)


def references(
    ort: dict[str, dict[str, float]], overhead: dict[str, Any], rss: dict[str, float] | None
) -> str:
    lines = [
        f"- {key}: {v['median_call_us']:.1f} us per call (median), "
        f"{v['samples_per_s']:,.0f} samples/s"
        for key, v in ort.items()
    ]
    lines.append(
        f"\nbatcher at c=1 (in-process, digits-mlp): direct {overhead['direct_p50_us']:.1f} us, "
        f"Batcher max_delay_ms=0 in a thread {overhead['batcher_delay0_p50_us']:.1f} us, "
        f"server default ({overhead['default_max_delay_ms']:g} ms, adaptive, "
        f"inline={overhead['default_inline']}) {overhead['batcher_default_p50_us']:.1f} us"
    )
    if rss:
        lines.append(f"foldserve RSS (MiB): {json.dumps({k: round(v, 1) for k, v in rss.items()})}")
    return "\n".join(lines)


def low_concurrency(paired: dict[str, Any]) -> str:
    """Issue 9's table: foldserve against the bare endpoint and raw ASGI, medians of rounds."""
    med = paired["median_of_rounds"]
    names = [n for n in ("foldserve", "bare", "raw-asgi") if n in med]
    head = " | ".join(f"{n} req/s | {n} p50 ms | {n} p99 ms" for n in names)
    lines = [
        f"| c | {head} | foldserve / bare req/s | foldserve - bare p50 ms |",
        "|--:|" + "--:|--:|--:|" * len(names) + "--:|--:|",
    ]
    for c in LEVELS:
        cells = []
        for n in names:
            m = med[n].get(str(c), {})
            cells += [fmt(m.get("requests_per_s"), ",.0f"), fmt(m.get("p50_ms"), ".3f")]
            cells.append(fmt(m.get("p99_ms")))
        rps = paired["median"].get(f"foldserve_vs_bare_rps_c{c}")
        p50 = paired["median"].get(f"foldserve_minus_bare_p50_ms_c{c}")
        lines.append(f"| {c} | {' | '.join(cells)} | {fmt(rps)} | {fmt(p50, '+.3f')} |")
    return "\n".join(lines)


def rounds_table(paired: dict[str, Any]) -> str:
    n = paired["rounds"]
    lines = [
        "| server | c | "
        + " | ".join(f"round {i + 1}: req/s, p50, p99 ms, CPU us/req, cores" for i in range(n))
        + " |",
        "|---|--:|" + "--:|" * n,
    ]
    for name, by_c in paired["measurements"].items():
        for c, ms in by_c.items():
            cells = " | ".join(
                f"{m['requests_per_s']:,.0f}, {m['p50_ms']:.2f}, {m['p99_ms']:.2f}, "
                f"{m['cpu_us_per_request']:.0f}, {m['server_cpu_cores']:.2f}"
                for m in ms
            )
            lines.append(f"| {name} | {c} | {cells} |")
    return "\n".join(lines)


def overload_table(scenario: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| case | run | c | goodput/s | % of peak | 200 p50 ms | 200 p99 ms | 503s | 503 p50 ms "
        "| 503 p99 ms | timeouts | late 200s | other errors | client CPU | server CPU "
        "| other CPU | server log bytes |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for key, s in scenario.items():
        peak = s["peak"]
        before, after = peak["runs"]
        runs = [("sweep up", r["passes"][0]) for r in s["sweep"]]
        runs += [("sweep down", r["passes"][1]) for r in reversed(s["sweep"])]
        runs += [("peak, before", before)]
        runs += [(f"{r['factor']}x", r) for r in s["overload"]]
        runs += [("info: issue 9's load", r) for r in s["fixed"]] + [("peak, after", after)]
        for label, r in runs:
            others = r["bad_answers"] + r["connection_errors"] + sum(r["other_status"].values())
            share = 100 * (ratio(r["goodput_per_s"], peak["goodput_per_s"]) or 0)
            lines.append(
                f"| {key} | {label} | {r['connections']} | {r['goodput_per_s']:,.0f} | "
                f"{share:.0f}% | {fmt(r['ok_p50_ms'])} | {fmt(r['ok_p99_ms'])} | "
                f"{r['refused']:,} | {fmt(r['refused_p50_ms'])} | {fmt(r['refused_p99_ms'])} | "
                f"{r['timeouts']:,} | {r['late_ok']} | {others} | {r['client_cpu_cores']:.2f} | "
                f"{fmt(r['server_cpu_cores'])} | {r['other_cpu_cores']:.2f} | "
                f"{r['server_log_bytes']:,} |"
            )
    lines.append("")
    for key, s in scenario.items():
        means = ", ".join(f"c={r['connections']} {r['goodput_per_s']:,.0f}" for r in s["sweep"])
        lines.append(
            f"- {key}: sweep goodput/s, mean of up and down: {means}; best concurrency "
            f"{s['peak']['concurrency']} ({s['peak']['chosen_by']}); peak "
            f"{s['peak']['goodput_per_s']:,.0f}/s (mean of before and after)"
        )
    return "\n".join(lines)


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | value | goal | result | detail |", "|---|--:|---|---|---|"]
    for t in rows:
        lines.append(
            f"| {t['target']} | {fmt(t['value'], '.3f')} | {t['goal']} | {t['result']} "
            f"| {t['detail']} |"
        )
    return "\n".join(lines)


def profile_text(prof: dict[str, Any]) -> str:
    lines = [f"threads: {prof['threads_pct_of_all']}"]
    for title in (
        "loop_by_layer",
        "loop_self_by_service_line",
        "loop_self_by_function",
        "loop_inclusive_by_function",
    ):
        lines.append(f"\n{title}:")
        lines += [f"  {p:5.1f}%  {name}" for name, p in prof[title][:15]]
    return "\n".join(lines)
