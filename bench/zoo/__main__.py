"""``python -m bench.zoo``: run the catalogue (or part of it) and write the report.

bench/model-zoo                   every network -> docs/model-zoo.md + bench/zoo/results/*.json
bench/model-zoo --quick           a few networks, for development
bench/model-zoo --only unet       rows whose name contains "unet" (case-insensitive)
bench/model-zoo --list            the rows and the coverage of monai.networks.nets, no run
bench/model-zoo --only 224 --append-to bench/zoo/results/zoo-X.json   add rows to a run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
QUICK = (
    "resnet18-2d",
    "DenseNet121-2d",
    "UNet-3d",
    "BasicUNet-2d",
    "SegResNetVAE-2d",
    "efficientnet-pytorch-b0",
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # NOTE: monai warns at import about every optional package it lacks, and torch's exporter
    # about its internals; none of it concerns the figures.
    warnings.simplefilter("ignore")
    from bench.zoo import coverage, environment, report
    from bench.zoo.catalogue import catalogue
    from bench.zoo.measure import Options

    if args.render:
        earlier = json.loads(args.render.read_text())
        target = args.output or args.render.with_suffix(".md")
        target.write_text(report.markdown(earlier))
        print(f"wrote {_relative(target)} from {_relative(args.render)}", file=sys.stderr)
        return 0
    every = catalogue()
    selected = _select(every, args)
    coverage_entries = [asdict(e) for e in coverage.entries(every)]
    if args.list:
        for network in selected:
            print(f"{network.name:36s} {network.task:15s} {network.input_shape}")
        for entry in coverage_entries:
            if not entry["rows"]:
                print(f"  skipped {'/'.join(entry['names'])}: {entry['reason']}")
        return 0
    if args.append_to is not None:
        return _append(selected, args, argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.results_dir / f"zoo-{stamp}.json"
    full = not (args.only or args.quick)
    # A partial run prints its page unless told where to write it: docs/ holds full runs only.
    markdown_path: Path | None = args.output or (ROOT / "docs" / "model-zoo.md" if full else None)
    options = Options(check_samples=args.check_samples, bitwise_rows=args.bitwise_rows)
    run: dict[str, Any] = {
        "command": shlex.join(["bench/model-zoo", *(argv if argv is not None else sys.argv[1:])]),
        "json": _relative(json_path),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": environment.describe(),
        "options": asdict(options),
        "coverage": coverage_entries,
        "rows": [],
    }
    _measure_all(selected, options, run, json_path)
    page = report.markdown(run)
    if markdown_path is None:
        print(page)
        print(f"wrote {_relative(json_path)}", file=sys.stderr)
        return 0
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(page)
    print(f"wrote {_relative(markdown_path)} and {_relative(json_path)}", file=sys.stderr)
    return 0


def _append(selected: list[Any], args: argparse.Namespace, argv: list[str] | None) -> int:
    """Measure ``selected`` and add the rows to an earlier run (its JSON and page): a row added
    to the catalogue after that run, or one rerun; the page says which, when, with what."""
    from bench.zoo import environment, report
    from bench.zoo.measure import Options

    path: Path = args.append_to
    run: dict[str, Any] = json.loads(path.read_text())
    options = Options(check_samples=args.check_samples, bitwise_rows=args.bitwise_rows)
    added: dict[str, Any] = {
        "command": shlex.join(["bench/model-zoo", *(argv if argv is not None else sys.argv[1:])]),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": environment.describe(),
        "rows": [],
    }
    _measure_all(selected, options, added, path.with_suffix(".adding.json"))
    names = {row["name"] for row in added["rows"]}
    run["rows"] = [row for row in run["rows"] if row["name"] not in names] + added["rows"]
    added["rows"] = sorted(names)
    run.setdefault("additions", []).append(added)
    report.write_json(path, run)
    path.with_suffix(".adding.json").unlink(missing_ok=True)
    target = args.output or ROOT / "docs" / "model-zoo.md"
    target.write_text(report.markdown(run))
    print(f"wrote {_relative(target)} and {_relative(path)}", file=sys.stderr)
    return 0


def _measure_all(selected: list[Any], options: Any, run: dict[str, Any], json_path: Path) -> None:
    from bench.zoo import report
    from bench.zoo.measure import measure

    started = time.perf_counter()
    for index, network in enumerate(selected, 1):
        print(f"[{index}/{len(selected)}] {network.name} ...", file=sys.stderr, flush=True)
        row = measure(network, options)
        run["rows"].append(row)
        print(f"    {row['status'][:160]} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        run["wall_s"] = time.perf_counter() - started
        report.write_json(json_path, run)  # after every row: a crash keeps what was measured
    run["wall_s"] = time.perf_counter() - started
    run["finished"] = datetime.now().astimezone().isoformat(timespec="seconds")
    run["environment"]["load_average_end"] = list(os.getloadavg())
    report.write_json(json_path, run)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/model-zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--only", metavar="NAME_SUBSTRING", help="rows whose name contains it")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--list", action="store_true", help="list the rows and skips; no run")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="rewrite the markdown of an earlier run; no run"
    )
    parser.add_argument(
        "--check-samples",
        type=int,
        default=4,
        help="generated samples foldserve.export checks each network on (default 4)",
    )
    parser.add_argument(
        "--bitwise-rows",
        type=int,
        default=8,
        help="measure bitwise batch invariance up to this many rows (0: foldserve's own cap, "
        "64 for these sizes: hours for the whole zoo; default 8)",
    )
    parser.add_argument(
        "--output", type=Path, help="markdown path (default: docs/model-zoo.md for a full run)"
    )
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "zoo" / "results")
    parser.add_argument(
        "--append-to",
        type=Path,
        metavar="JSON",
        help="add the selected rows to this earlier run (replacing rows of the same name) and "
        "rewrite its page (--output, default docs/model-zoo.md)",
    )
    return parser


def _select(every: list[Any], args: argparse.Namespace) -> list[Any]:
    selected = every
    if args.quick:
        selected = [n for n in selected if n.name in QUICK]
    if args.only:
        selected = [n for n in selected if args.only.lower() in n.name.lower()]
    if not selected:
        raise SystemExit(f"no network matches --only {args.only!r}; see --list")
    return selected


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
