"""Every test gets the markers of the tiers it needs (tests.tiers): ``-m "not (torch or server
or processes or browser)"`` is the fast tier that ``scripts/test --fast`` runs."""

from __future__ import annotations

import os

import pytest

from tests.tiers import needs

# The gRPC service binds its own port (8001 by default) in every server a test starts: off unless
# a test asks for it (on a port the OS picks), so that servers never contend for one port.
os.environ.setdefault("FOLDSERVE_GRPC", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for tier in needs(item):
            item.add_marker(tier)
