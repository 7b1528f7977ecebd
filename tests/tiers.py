"""Test tiers, decided by what each test needs, read off its code.

A test is in a slow tier when its function, a fixture it uses, or a helper of its own test
package that either calls reaches one of the names in NEEDS: torch (training or exporting a
model), a production server (started in a thread: ``serve``, ``running``), other processes
(``subprocess``, ``multiprocessing``), or a browser. The names are read from the compiled code
(``co_names``, nested functions included), and helpers are followed through the module's globals
and the fixtures' definitions, so a test that starts using a server moves tiers by itself.
``scripts/test --fast`` runs the rest: lint, types and the tests that need none of them.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pytest

NEEDS: dict[str, frozenset[str]] = {
    "torch": frozenset({"torch", "monai", "export_artifacts"}),
    "server": frozenset({"serve", "running", "run_in_thread"}),
    "processes": frozenset({"subprocess", "multiprocessing", "Popen", "spawn"}),
    "browser": frozenset({"launched", "find_chromium"}),
}
TIERS = tuple(NEEDS)
_OWN = ("tests.", "tests")  # helpers followed: the test packages' own functions only


def needs(item: pytest.Item) -> set[str]:
    """The tiers ``item`` needs (empty: the fast tier)."""
    names: set[str] = set()
    seen: set[int] = set()
    function = getattr(item, "function", None)
    if function is not None:
        _collect(function, names, seen)
    info = getattr(item, "_fixtureinfo", None)
    for fixture in [] if info is None else info.name2fixturedefs.values():
        for definition in fixture:
            _collect(definition.func, names, seen)
    return {tier for tier, wanted in NEEDS.items() if names & wanted}


def _collect(function: Any, names: set[str], seen: set[int]) -> None:
    function = getattr(function, "__wrapped__", function)
    code = getattr(function, "__code__", None)
    if code is None or id(code) in seen:
        return
    seen.add(id(code))
    scope = getattr(function, "__globals__", {})
    for name in _names(code):
        names.add(name)
        value = scope.get(name)
        if isinstance(value, types.ModuleType):
            names.add(value.__name__.split(".")[0])
        elif callable(value) and getattr(value, "__module__", "").startswith(_OWN):
            _collect(value, names, seen)
        elif isinstance(value, type) and value.__module__.startswith(_OWN):
            for member in vars(value).values():
                _collect(member, names, seen)


def _names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)
