"""Issue 17's targets: what a request costs (server CPU of all threads per answer), what a
hostile client costs the others, and how close real networks come to onnxruntime alone."""

from __future__ import annotations

from typing import Any

from load.paired import LEVELS
from load.target_table import Targets, fmt, from_rounds, ratio, round_medians
from load.wrk import Measurement

CORES_GOAL = 1.1  # one foldserve process: its event loop plus at most a tenth of a core more
KEEP_ANSWERS = 0.8
P99_FACTOR = 5.0
SERVED_VS_INPROCESS = 0.9


def cpu_vs_bare(
    t: Targets, by: dict[tuple[str, str, int], Measurement], paired: dict[str, Any] | None
) -> None:
    """Server CPU per request against the bare endpoint, and one foldserve process's cores."""
    for c in LEVELS:
        fs, bare = by.get(("foldserve", "mlpx1", c)), by.get(("bare", "mlpx1", c))
        a, b = round_medians(paired, "foldserve", c), round_medians(paired, "bare", c)
        from_rounds(
            t,
            paired,
            f"mlp x1 c={c} server CPU/request vs bare",
            f"foldserve_vs_bare_cpu_per_request_c{c}",
            ratio(fs.cpu_us_per_request if fs else None, bare.cpu_us_per_request if bare else None),
            1.0,
            higher=False,
            figures=f"foldserve {a['cpu_us_per_request']:.0f} us vs bare "
            f"{b['cpu_us_per_request']:.0f} us per request"
            if a and b
            else "",
        )
    cores = {c: round_medians(paired, "foldserve", c).get("server_cpu_cores") for c in LEVELS}
    if not any(v is not None for v in cores.values()):  # no paired rounds: the main matrix
        cores = {c: m.server_cpu_cores for c in LEVELS if (m := by.get(("foldserve", "mlpx1", c)))}
    known = [v for v in cores.values() if v is not None]
    t.add(
        "foldserve (1 process) cores, highest of c=1, 8, 64",
        max(known) if known else None,
        CORES_GOAL,
        higher=False,
        detail=", ".join(f"c={c}: {fmt(v)}" for c, v in cores.items())
        + (" (medians of paired rounds)" if paired else " (main matrix)"),
    )


def rows64(t: Targets, result: dict[str, Any] | None) -> None:
    """64-row requests: server CPU per request within bare + 2 x ORT (+ the JSON parse)."""
    if not result:
        return
    for key, r in result["cases"].items():
        parse = f" + JSON parse {r['json_parse_us']:.0f} us" if r["json_parse_us"] else ""
        t.add(
            f"{key} server CPU/request, us (c={r['connections']})",
            r["foldserve_cpu_us_per_request"],
            round(r["bound_us"], 1),
            higher=False,
            detail=f"bound = bare {r['bare_cpu_us_per_request']:.0f} us + 2 x ORT batch 64 "
            f"{r['ort_batch64_us']:.0f} us{parse} (medians of {result['rounds']} rounds; "
            f"each: {', '.join(f'{v:.0f}' for v in r['per_round']['foldserve'])} us)",
        )


def hostile(t: Targets, result: dict[str, Any] | None) -> None:
    """The ordinary clients keep their answers and latency; the server keeps its memory."""
    if not result:
        return
    phases = result["phases"]
    alone = phases.get("alone")
    for kind in ("json", "gzip"):
        r = phases.get(kind)
        if alone is None or r is None:
            t.add(f"hostile {kind}: ordinary clients' answers/s kept", None, KEEP_ANSWERS)
            continue
        h = r["hostile"] or {}
        t.add(
            f"hostile {kind} (~60 MB bodies): ordinary clients' answers/s kept",
            ratio(r["goodput_per_s"], alone["goodput_per_s"]),
            KEEP_ANSWERS,
            detail=f"{r['goodput_per_s']:,.0f} vs {alone['goodput_per_s']:,.0f} answers/s "
            f"alone; hostile client: {h.get('answers', 0)} answers {h.get('statuses', {})}, "
            f"{h.get('lost_without_answer', 0)} lost",
        )
        t.add(
            f"hostile {kind}: ordinary clients' p99 / p99 alone",
            ratio(r["ok_p99_ms"], alone["ok_p99_ms"]),
            P99_FACTOR,
            higher=False,
            detail=f"{fmt(r['ok_p99_ms'])} ms vs {fmt(alone['ok_p99_ms'])} ms",
        )
    peaks = {kind: r["peak_rss_mib"] for kind, r in phases.items()}
    t.add(
        "hostile phases: server's peak RSS, MiB",
        max(peaks.values()),
        result["rss_limit_mib"],
        higher=False,
        detail=", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + " (VmRSS polled every 10 ms)",
    )


def real_networks(t: Targets, result: dict[str, Any] | None) -> None:
    """Served images/s against onnxruntime in-process with all the machine's cores."""
    for name, m in (result or {}).get("models", {}).items():
        ref = m["inprocess"]["all_cores"]
        for c, s in m["served"].items():
            t.add(
                f"{name} served images/s vs in-process ORT ({ref['threads']} threads), c={c}",
                ratio(s["images_per_s"], ref["images_per_s"]),
                SERVED_VS_INPROCESS,
                detail=f"{s['images_per_s']:.1f} vs {ref['images_per_s']:.1f} images/s"
                + _before_after(m["inprocess"])
                + _floor(m, c)
                + "; "
                f"p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, server "
                f"{s['cpu_ms_per_request']:.0f} ms CPU/request, {s['errors']} errors",
            )


def _floor(m: dict[str, Any], c: str) -> str:
    """The floor server's figure (``servers.v2_floor``) at the same connections, when run."""
    floor = m.get("floor", {}).get(c)
    if floor is None:
        return ""
    return f"; the floor server {floor['images_per_s']:.1f}"


def _before_after(refs: dict[str, Any]) -> str:
    """The reference's two measurements, when the run took both."""
    before, after = refs.get("all_cores_before"), refs.get("all_cores_after")
    if before is None or after is None:
        return ""
    return f" (mean of {before['images_per_s']:.1f} before, {after['images_per_s']:.1f} after)"
