# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import HELPER, TcpPairs

#: Test modules that need no privilege at all: the pure protocol and wire format, the public API, the
#: packaging. As a non-root user these run and every other test is skipped, with the reason below.
UNPRIVILEGED_MODULES = {"test_protocol.py", "test_tcp_wire.py", "test_api.py", "test_packaging.py"}
NEEDS_ROOT = (
    "needs root: it switches real sockets through the installed helper, makes network namespaces "
    "or drops capabilities (run the whole suite as root, as CI does)"
)


def pytest_configure(config: pytest.Config) -> None:
    if not HELPER.exists():
        raise pytest.UsageError(f"{HELPER} is missing: install the package first (pip install '.[test]')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason=NEEDS_ROOT)
    for item in items:
        if Path(item.path).name not in UNPRIVILEGED_MODULES:
            item.add_marker(skip)


@pytest.fixture
def pairs() -> Iterator[TcpPairs]:
    p = TcpPairs()
    yield p
    p.close()
