"""The targets table: one row per target, PASS or FAIL with the figures that decide it, and the
small helpers every target uses (targets.py, targets_cost.py)."""

from __future__ import annotations

from typing import Any


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


class Targets:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self, name: str, value: float | None, goal: float, higher: bool = True, detail: str = ""
    ) -> None:
        ok = None if value is None else (value >= goal if higher else value <= goal)
        self.rows.append(
            {
                "target": name,
                "value": value,
                "goal": f"{'>=' if higher else '<='} {goal:g}",
                "result": "n/a" if ok is None else ("PASS" if ok else "FAIL"),
                "detail": detail,
            }
        )


def from_rounds(
    t: Targets, paired: dict[str, Any] | None, name: str, key: str, single: float | None,
    goal: float, higher: bool = True, figures: str = "",
) -> None:  # fmt: skip
    """With paired rounds, their median decides; the main matrix's value is shown beside."""
    if paired is None or key not in paired["ratios"]:
        t.add(name, single, goal, higher, "; ".join(x for x in ("main matrix", figures) if x))
        return
    each = paired["ratios"][key]
    t.add(
        name,
        paired["median"][key],
        goal,
        higher,
        f"median of {len(each)} paired rounds (each: {', '.join(f'{v:.2f}' for v in each)}); "
        f"{figures + '; ' if figures else ''}main matrix {fmt(single)}",
    )


def round_medians(paired: dict[str, Any] | None, server: str, c: int) -> dict[str, float]:
    if paired is None:
        return {}
    medians: dict[str, float] = paired["median_of_rounds"].get(server, {}).get(str(c), {})
    return medians
