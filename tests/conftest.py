from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from support import HELPER, TcpPairs


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("the tests switch real sockets and need root (CI runs them as root)")
    if not HELPER.exists():
        raise pytest.UsageError(f"{HELPER} is missing: install the package first (pip install '.[test]')")


@pytest.fixture
def pairs() -> Iterator[TcpPairs]:
    p = TcpPairs()
    yield p
    p.close()
