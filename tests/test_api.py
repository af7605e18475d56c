# SPDX-License-Identifier: GPL-2.0-or-later
"""The public API: what `import passt_repair` costs, what it exports, and that all of it is documented."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import passt_repair
from passt_repair import aio, protocol, server


def modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter imports for `statement`, beyond its own start-up."""
    probe = f"import sys; before = set(sys.modules); {statement}; print(' '.join(sorted(set(sys.modules) - before)))"
    r = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True)
    return set(r.stdout.split())


def test_importing_the_package_imports_nothing_else() -> None:
    assert modules_after("import passt_repair") == {"passt_repair"}


def test_helper_command_line_stays_light() -> None:
    """The console script imports passt_repair.cli; --help and --version must not pull in the libraries."""
    loaded = modules_after("import passt_repair.cli")
    assert not loaded & {"socket", "asyncio", "logging", "typing", "passt_repair.server", "passt_repair.aio"}


@pytest.mark.parametrize("name", passt_repair.__all__)
def test_public_name_resolves_and_is_documented(name: str) -> None:
    value = getattr(passt_repair, name)
    assert name in dir(passt_repair)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert inspect.getdoc(value), f"{name} has no docstring"


def test_public_names_come_from_their_modules() -> None:
    assert passt_repair.RepairServer is server.RepairServer
    assert passt_repair.AsyncRepairServer is aio.AsyncRepairServer
    assert passt_repair.Command is protocol.Command
    assert set(passt_repair.__all__) - {"__version__"} <= set(server.__all__) | set(aio.__all__) | set(protocol.__all__)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nonexistent'"):
        _ = passt_repair.Nonexistent  # type: ignore[attr-defined]


def public(cls: type) -> dict[str, object]:
    """The public members of `cls`, inherited ones included, as defined (functions and properties, unbound)."""
    return {name: inspect.getattr_static(cls, name) for name in dir(cls) if not name.startswith("_")}


@pytest.mark.parametrize("cls", [server.RepairServer, aio.AsyncRepairServer])
def test_every_public_method_is_documented(cls: type) -> None:
    members = public(cls)
    assert {"accept", "switch", "queue", "flush", "repair", "listen", "detach", "close", "helper"} <= members.keys()
    for name, member in members.items():
        target = member.fget if isinstance(member, property) else member
        assert inspect.getdoc(target), f"{cls.__name__}.{name} has no docstring"


def test_async_server_mirrors_the_blocking_one() -> None:
    """The same public methods and properties, with the same parameters; the waits are coroutines."""
    blocking, asynchronous = public(server.RepairServer), public(aio.AsyncRepairServer)
    assert blocking.keys() == asynchronous.keys()
    for name, member in blocking.items():
        if callable(member):
            other = asynchronous[name]
            assert callable(other)
            assert inspect.signature(member).parameters.keys() == inspect.signature(other).parameters.keys(), name
    for name in ("accept", "switch", "queue", "flush"):
        assert inspect.iscoroutinefunction(asynchronous[name]), name
    assert inspect.signature(server.RepairServer).parameters == inspect.signature(aio.AsyncRepairServer).parameters
