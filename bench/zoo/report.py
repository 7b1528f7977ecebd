"""Write a run as JSON (the raw figures) and as the markdown page docs/model-zoo.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.zoo import notes

PLACEMENTS = ("folded_into_previous", "folded_into_next", "frozen_affine")
EMPTY = "-"
DEFAULT_RTOL = 1e-4


def write_json(path: Path, run: dict[str, Any]) -> None:
    """Compact, one top-level field and one row per line: ~1.5 kB a row, diffable by row."""

    def dump(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), default=str)

    fields = [f"{dump(key)}:{dump(value)}" for key, value in run.items() if key != "rows"]
    rows = ",\n".join(dump(row) for row in run["rows"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("{" + ",\n".join(fields) + ',\n"rows":[\n' + rows + "\n]}\n")
    tmp.replace(path)


def markdown(run: dict[str, Any]) -> str:
    rows = run["rows"]
    measured = [r for r in rows if not r["status"].startswith("skipped")]
    passed = [r for r in measured if r["status"].startswith("passed")]
    env = run["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    options = run["options"]
    lines = [
        "# Model zoo: BatchNorm folding on real networks",
        "",
        "Every network of `monai.networks.nets` that can hold BatchNorm, and efficientnet-"
        "pytorch's EfficientNet-B0 to B7, randomly initialized (`pretrained=False`), given "
        "non-trivial BN statistics, then put through `foldserve.export` as a user would, and "
        "measured. A network **passes** when the export succeeds: foldserve then proved the "
        "folded files equal the eval-mode model (within atol 1e-4 plus rtol x each sample's "
        "largest output; rtol is 1e-4, or 4x the network's own float32 error against float64 "
        "when that is larger, at most 1e-3: the table shows it where it is not 1e-4), "
        "batch-invariant, and free of batch-statistics ops. This is a report, not a test: the "
        "test suite does not run it.",
        "",
        f"- Command: `{run['command']}` (JSON of the raw figures: `{run['json']}`)",
        f"- Date: {run['started']} to {run.get('finished', '(unfinished)')} "
        f"(total {run.get('wall_s', 0.0) / 60:.1f} min)",
        f"- Machine: {env['cores']} cores, CPU only ({env['cpu']}), {env['memory_gib']} GiB RAM;"
        f" shared with other work (load average {_load(env)})",
        f"- Python {env['python']}; {versions}",
        _code(env),
        *_additions(run),
        f"- **{len(passed)} of {len(measured)} networks passed**"
        f" ({_count(measured, 'refused')} refused, {_count(measured, 'error')} errors;"
        f" {_several_outputs(passed)} of those passed return several outputs, each checked and"
        " served by name);"
        f" {len(rows) - len(measured)} more rows could not be built here (see Skipped)",
        "",
        *notes.method(options),
        "",
        "## Results",
        "",
        *table(measured, options),
        "",
        *failures(measured),
        *skipped(run["coverage"], rows),
        *notes.observations(passed, options),
    ]
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]], options: dict[str, Any]) -> list[str]:
    bitwise = options["bitwise_rows"] or "cap"
    header = [
        "network",
        "task",
        "input",
        "status",
        "BN",
        "prev / next / affine",
        "path",
        "max abs Δ",
        "rel Δ",
        "batch Δ",
        f"bitwise ≤{bitwise}",
        "export s (all / fold+export)",
        "ONNX MB",
        "unfolded BN ops / not fused by ORT",
        "ORT ms b1 (folded / unfolded)",
        "ORT ms bN (folded / unfolded)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    return lines


def _cells(r: dict[str, Any]) -> list[str]:
    shape = "x".join(map(str, r["input_shape"]))
    status = r["status"] if r["status"] == "passed" else _short_status(r)
    outputs = r.get("output_count", 1)
    task = r["task"] + (f" ({outputs} outputs)" if outputs > 1 else "")
    cells = [f"`{r['name']}`", task, shape, status, str(r.get("batch_norms", EMPTY))]
    if "export_s" not in r:
        return [*cells, *[EMPTY] * 11]
    counts = r["placements"]
    if r["recorded_batch_norms"] != r["batch_norms"]:
        # Not in the manifest: a BN forward() never calls, or one torch's ONNX optimizer folded.
        cells[4] = f"{r['batch_norms']} ({r['recorded_batch_norms']} recorded)"
    abs_diff = max(r["max_abs_diff"], r.get("own_max_abs_diff", 0.0))
    rel_diff = max(r["max_rel_diff"], r.get("own_max_rel_diff", 0.0))
    latency = r.get("latency_ms")
    return [
        *cells,
        " / ".join(str(counts.get(p, 0)) for p in PLACEMENTS),
        "fx" if r["fold_path"] == "torch.fx" else "**onnx**",
        _sci(abs_diff),
        _sci(rel_diff) + _tolerance(r),
        _sci(r["batch_invariance_max_diff"]),
        {True: "yes", False: "**no**", None: EMPTY}[r["bitwise_batch_invariant"]],
        f"{r['export_s']:.1f} / {r['steps_s']['fold+export']:.1f}",
        f"{r['files']['onnx'] / 1e6:.1f}",
        _ort_left(r),
        _pair(latency, "1"),
        _pair(latency, str(r["latency_batch"])) + f" (N={r['latency_batch']})"
        if latency
        else EMPTY,
    ]


def failures(rows: list[dict[str, Any]]) -> list[str]:
    failed = [r for r in rows if not r["status"].startswith("passed")]
    zoo_failed = [r for r in rows if r["status"].startswith("passed (")]
    lines = ["## Failures", ""]
    if not failed and not zoo_failed:
        return [*lines, "None.", ""]
    for r in failed + zoo_failed:
        lines.append(f"- `{r['name']}` ({r['failed_stage']}): {r['status']}")
    return [*lines, "", *notes.failure_causes(failed), ""]


def skipped(coverage: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Skipped",
        "",
        "Every class and function `monai.networks.nets` exports (aliases grouped) that has no row",
        "above, and why:",
        "",
    ]
    for entry in coverage:
        if entry["rows"]:
            continue
        lines.append(f"- {' / '.join(f'`{n}`' for n in entry['names'])}: {entry['reason']}")
    missing = [r for r in rows if r["status"].startswith("skipped")]
    if missing:
        lines += ["", "Catalogued, but not buildable in this environment:", ""]
        lines += [f"- `{r['name']}`: {r['status'].removeprefix('skipped: ')}" for r in missing]
    return [*lines, ""]


def _short_status(r: dict[str, Any]) -> str:
    kind, _, message = r["status"].partition(": ")
    if kind.startswith("passed"):
        return "passed (zoo step failed)"
    error_type = message.split(":", 1)[0] if kind == "error" else ""
    return f"**{kind}**" + (f" ({error_type})" if error_type else "")


def _pair(latency: dict[str, dict[str, float]] | None, batch: str) -> str:
    if not latency:
        return EMPTY
    return f"{latency['folded'][batch]:.1f} / {latency['unfolded'][batch]:.1f}"


def _tolerance(r: dict[str, Any]) -> str:
    rtol = r.get("rtol")
    return f" (rtol {rtol:.1e})" if rtol is not None and rtol != DEFAULT_RTOL else ""


def _ort_left(r: dict[str, Any]) -> str:
    if "unfolded_batchnorm_ops_unfused_by_ort" not in r:
        return EMPTY
    return f"{r['unfolded_batchnorm_ops']} / {r['unfolded_batchnorm_ops_unfused_by_ort']}"


def _sci(value: float | None) -> str:
    if value is None:
        return EMPTY
    return "0" if value == 0 else f"{value:.1e}"


def _additions(run: dict[str, Any]) -> list[str]:
    """Rows measured after the run (``--append-to``): which, when, with what command."""
    return [
        f"- Added on {added['started']}: {', '.join(f'`{n}`' for n in added['rows'])} "
        f"(`{added['command']}`)"
        for added in run.get("additions", [])
    ]


def _several_outputs(rows: list[dict[str, Any]]) -> int:
    return sum(r.get("output_count", 1) > 1 for r in rows)


def _count(rows: list[dict[str, Any]], kind: str) -> int:
    return sum(r["status"].startswith(kind) for r in rows)


def _code(env: dict[str, Any]) -> str:
    git = env.get("git")
    if not git:
        return "- Code: not recorded"
    changed = git["uncommitted_in_foldserve_or_service"]
    dirty = f"plus uncommitted changes to {len(changed)} files" if changed else "no local changes"
    return f"- Code: commit `{git['commit']}` ({dirty} in foldserve/ and service/)"


def _load(env: dict[str, Any]) -> str:
    start = env["load_average_start"][0]
    end = env.get("load_average_end", [math.nan])[0]
    return f"{start:.2f} at the start, {end:.2f} at the end"
