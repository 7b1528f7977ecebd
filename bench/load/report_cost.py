"""Markdown tables of issue 17's parts: CPU per request, 64-row bounds, the hostile client, real
networks."""

from __future__ import annotations

from typing import Any

from load.paired import LEVELS
from load.target_table import fmt


def cost_table(paired: dict[str, Any]) -> str:
    """Per server and concurrency: req/s, server CPU per request and cores, medians of rounds."""
    med, ratios = paired["median_of_rounds"], paired["median"]
    lines = [
        "| server | c | req/s | server CPU us/request | server cores "
        "| CPU/request vs bare | req/s vs bare |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, by_c in med.items():
        for c in LEVELS:
            m = by_c.get(str(c))
            if m is None:
                continue
            fs = name == "foldserve"
            cpu = ratios.get(f"foldserve_vs_bare_cpu_per_request_c{c}") if fs else None
            rps = ratios.get(f"foldserve_vs_bare_rps_c{c}") if fs else None
            lines.append(
                f"| {name} | {c} | {m['requests_per_s']:,.0f} | {m['cpu_us_per_request']:.0f} "
                f"| {m['server_cpu_cores']:.2f} | {fmt(cpu)} | {fmt(rps)} |"
            )
    return "\n".join(lines)


def rows64_table(result: dict[str, Any]) -> str:
    lines = [
        "| case | c | foldserve req/s | foldserve cores | foldserve CPU us/req | bare CPU us/req "
        "| ORT batch 64 us | JSON parse us | bound us | within |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for key, r in result["cases"].items():
        within = r["foldserve_cpu_us_per_request"] <= r["bound_us"]
        lines.append(
            f"| {key} | {r['connections']} | {r['foldserve_requests_per_s']:,.0f} | "
            f"{r['foldserve_cores']:.2f} | {r['foldserve_cpu_us_per_request']:.0f} | "
            f"{r['bare_cpu_us_per_request']:.0f} | {r['ort_batch64_us']:.0f} | "
            f"{r['json_parse_us']:.0f} | {r['bound_us']:.0f} | {'yes' if within else 'NO'} |"
        )
    lines.append(
        f"\nbound = bare's CPU/request on the same body + 2 x ORT batch 64 (+ the JSON parse: "
        f"orjson.loads + np.asarray on the {result['json_body_bytes']:,}-byte body wrk sends); "
        f"medians of {result['rounds']} rounds"
    )
    return "\n".join(lines)


def hostile_table(result: dict[str, Any]) -> str:
    lines = [
        "| phase | answers/s | p50 ms | p99 ms | timeouts | other errors | server cores "
        "| peak RSS MiB | hostile requests | hostile answers (statuses) | hostile lost "
        "| busy after, s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for kind, r in result["phases"].items():
        h = r["hostile"]
        got = f"{h['answers']} {h['statuses']}" if h else "-"
        others = r["bad_answers"] + r["connection_errors"] + sum(r["other_status"].values())
        lines.append(
            f"| {kind} | {r['goodput_per_s']:,.0f} | {fmt(r['ok_p50_ms'])} | "
            f"{fmt(r['ok_p99_ms'])} | {r['timeouts']} | {others} | "
            f"{fmt(r['server_cpu_cores'])} | {r['peak_rss_mib']:.0f} | "
            f"{h['requests_started'] if h else '-'} | {got} | "
            f"{h['lost_without_answer'] if h else '-'} | {r['busy_after_s']:.1f} |"
        )
    lines.append(
        f"\n{result['ordinary_connections']} ordinary connections (digits-mlp, one sample), "
        f"{result['seconds']:g} s per phase, deadline {result['deadline_s']:g} s; one hostile "
        "connection: ~60 MB JSON bodies, or gzip bodies inflating to them"
        + "".join(
            f"; server exited in phase {k} ({r['server_exited']})"
            for k, r in result["phases"].items()
            if "server_exited" in r
        )
    )
    return "\n".join(lines)


def real_table(result: dict[str, Any]) -> str:
    store = result["store"]
    lines = [
        "| model | input | in-process images/s (all cores / 1 thread) | c | served images/s "
        "| vs in-process | floor images/s (vs in-process) | vs floor | p50 ms | p99 ms "
        "| server CPU ms/req | server cores | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, m in result["models"].items():
        ref = m["inprocess"]
        for c, s in m["served"].items():
            all_cores = ref["all_cores"]["images_per_s"]
            floor = m.get("floor", {}).get(c)
            floor_cells = (
                f"{floor['images_per_s']:.1f} ({floor['images_per_s'] / all_cores:.2f}) | "
                f"{s['images_per_s'] / floor['images_per_s']:.2f}"
                if floor
                else "- | -"
            )
            lines.append(
                f"| {name} | {m['input_shape']} | {all_cores:.1f} / "
                f"{ref['one_thread']['images_per_s']:.1f} | {c} | {s['images_per_s']:.1f} | "
                f"{s['images_per_s'] / all_cores:.2f} | {floor_cells} | "
                f"{s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {s['cpu_ms_per_request']:.1f} | "
                f"{s['server_cpu_cores']:.2f} | {s['errors']} |"
            )
    built = (
        "reused from the cache"
        if store["cached"]
        else f"built in {store['build_seconds']:.0f} s (now cached)"
    )
    lines.append(
        f"\nstore {store['path']}: {built}; {store['method']}. foldserve ready in "
        f"{result['ready_s']:.0f} s, RSS once ready {result['rss_ready_mib']:.0f} MiB "
        "(default settings, V2 binary tensors, one image per request)"
    )
    return "\n".join(lines)
