"""tests/tiers.py reads each test's needs off its code: the fast tier must not hide a server, a
process or torch behind a helper or a fixture."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace
from typing import Any

from tests.service.conftest import serve
from tests.tiers import needs


def item(function: Any, *fixtures: Any) -> Any:
    defs = {f.__name__: [SimpleNamespace(func=f)] for f in fixtures}
    return SimpleNamespace(function=function, _fixtureinfo=SimpleNamespace(name2fixturedefs=defs))


def plain() -> None:
    assert sum([1, 2]) == 3


def starts_a_process() -> None:
    subprocess.run(["true"], check=True)


def helper_that_serves() -> None:
    with serve(None):  # type: ignore[arg-type]  # never called: only read
        pass


def through_a_helper() -> None:
    helper_that_serves()


def nested() -> None:
    def inner() -> None:
        starts_a_process()

    inner()


def test_needs_are_read_through_helpers_nested_functions_and_fixtures() -> None:
    assert needs(item(plain)) == set()
    assert needs(item(starts_a_process)) == {"processes"}
    assert needs(item(through_a_helper)) == {"server"}
    assert needs(item(nested)) == {"processes"}
    assert needs(item(plain, starts_a_process)) == {"processes"}  # a fixture's needs count


def test_the_shared_fixtures_land_in_their_tiers() -> None:
    from tests.service import conftest

    # The store fixture needs the exported tiny model: torch.
    assert "torch" in needs(item(plain, conftest.store, conftest.artifacts))
    assert needs(item(plain, conftest.shipped_store)) == set()  # a copy of files: fast
