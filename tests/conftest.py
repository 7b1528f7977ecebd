"""Every test gets the markers of the tiers it needs (tests.tiers): ``-m "not (torch or server
or processes or browser)"`` is the fast tier that ``scripts/test --fast`` runs."""

from __future__ import annotations

import pytest

from tests.tiers import needs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for tier in needs(item):
            item.add_marker(tier)
