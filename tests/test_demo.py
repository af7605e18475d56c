# SPDX-License-Identifier: GPL-2.0-or-later
"""passt-repair-demo, run as a user would: as root, and with no capability at all."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import SETPRIV_NO_CAPS

DEMO = Path(sys.executable).with_name("passt-repair-demo")


def _run(prefix: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, str(DEMO)], capture_output=True, text=True, timeout=60, check=False)


def _assert_moved(out: str) -> None:
    assert "checkpoint: the helper switched repair mode on" in out
    assert "the new socket reads what waited in the old one: 'still unread when the socket froze'" in out
    after = out.split("bytes after the move", 1)[1]
    assert "server sent 'hello from the new socket': arrived intact" in after
    assert "peer sent 'hello, new socket': arrived intact" in after
    assert "the peer read a clean end of file (no reset)" in after
    # The sequence numbers read back from the new socket are the old socket's, plus what was queued.
    lines = out.splitlines()
    dumped = next(line for line in lines if line.strip().startswith("send sequence"))
    restored = next(line for line in lines if "its send queue ends at" in line)
    send_seq = int(dumped.split("send sequence ")[1].split(",")[0])
    recv_seq = int(dumped.split("receive sequence ")[1].split(",")[0])
    unread = int(dumped.split(", ")[2].split()[0])
    assert f"its send queue ends at {send_seq}, its receive queue at {(recv_seq + unread) % 2**32}" in restored


def test_demo_as_root() -> None:
    done = _run([])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "re-running" not in done.stdout
    _assert_moved(done.stdout)


def test_demo_without_capabilities_arranges_a_namespace() -> None:
    """With no capability, the demo says so, moves itself into a private user and network namespace, and works."""
    done = _run(SETPRIV_NO_CAPS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("No CAP_NET_ADMIN here: re-running in a private user and network namespace.")
    assert "brought the loopback interface up" in done.stdout
    _assert_moved(done.stdout)


def test_demo_where_no_namespace_can_be_had() -> None:
    """Told it is already inside the private namespace, yet without the capability: one line saying what to do."""
    done = subprocess.run(
        [*SETPRIV_NO_CAPS, "env", "PASST_REPAIR_DEMO_UNSHARED=1", str(DEMO)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("passt-repair-demo: error: no CAP_NET_ADMIN")
    assert "run as root" in lines[0]
    assert "unshare -Urn" in lines[0]


def test_demo_usage() -> None:
    done = subprocess.run([str(DEMO), "extra"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("passt-repair-demo: unexpected argument extra")
    helped = subprocess.run([str(DEMO), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert helped.returncode == 0
    assert "unshare -Urn" in helped.stdout


def test_demo_in_a_new_network_namespace() -> None:
    """The help's own hint, `unshare -Urn passt-repair-demo`: loopback starts down there, the demo brings it up."""
    done = _run(["unshare", "-Urn"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("In a new network namespace: brought the loopback interface up.")
    _assert_moved(done.stdout)


def test_demo_in_a_user_namespace_alone_shows_the_helpers_log() -> None:
    """`unshare -Ur`: CAP_NET_ADMIN in a user namespace that does not own the sockets' network namespace.
    The helper refuses with EPERM; the demo's one line carries the helper's own words and what to run instead."""
    done = _run(["unshare", "-Ur"])
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("passt-repair-demo: error: checkpoint: ")
    log = lines[0].split("; the helper's log: ", 1)[1]
    assert log.startswith("passt-repair: error: command ON (1) on 1 ")
    assert "setsockopt(TCP_REPAIR): EPERM" in log
    assert " connected to " not in log
    assert lines[0].endswith("unshare -Urn passt-repair-demo")


def test_demo_does_not_wait_for_a_helper_that_exited(tmp_path: Path) -> None:
    """A helper that exits before connecting (no capability, a bad path) ends the wait at once, with its words."""
    from passt_repair.demo import DemoError, _accept
    from passt_repair.server import RepairServer

    with RepairServer(tmp_path / "demo.repair") as server:
        helper = subprocess.Popen(
            ["sh", "-c", "echo 'passt-repair: error: no CAP_NET_ADMIN' >&2; exit 1"], stderr=subprocess.PIPE
        )
        started = time.monotonic()
        with pytest.raises(DemoError) as caught:
            _accept(server, helper, timeout=10)
        took = time.monotonic() - started
    assert (
        str(caught.value) == "the helper exited with status 1 before connecting: passt-repair: error: no CAP_NET_ADMIN"
    )
    assert took < 5, f"waited {took:.1f} s for a helper that had exited"
