# SPDX-License-Identifier: GPL-2.0-or-later
"""The server library against the real installed helper: listening, attaching, batching, context manager."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from passt_repair.protocol import Command
from passt_repair.server import HelperGoneError, NoHelperError, RepairError, RepairServer, repair_state
from support import Helper, TcpPairs, states


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RepairServer]:
    with RepairServer(tmp_path / "app.repair", reply_timeout=10) as s:
        yield s


def attach(server: RepairServer, *args: str) -> Helper:
    helper = Helper(*args, server.path)
    server.accept(timeout=10)
    return helper


def debug_counts(helper: Helper) -> list[tuple[str, int]]:
    """(command, count) of every request, from the helper's --debug log."""
    out = []
    for line in helper.stderr.splitlines():
        if " sockets in " in line or " socket in " in line:
            words = line.split()
            out.append((words[1], int(words[4])))
    return out


# -- the socket file ------------------------------------------------------------


def test_socket_file_mode_and_removal(tmp_path: Path) -> None:
    path = tmp_path / "x.repair"
    server = RepairServer(path)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    server.close()
    assert not path.exists()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "x.repair"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # a server that died without cleaning up
    dead.close()
    with RepairServer(path) as server:
        helper = attach(server)
        assert server.attached
    assert helper.wait() == 0


@pytest.mark.parametrize("kind", ["file", "directory", "live"])
def test_refuses_to_clobber(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.repair"
    live = socket.socket(socket.AF_UNIX)
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        live.bind(str(path))
        live.listen(1)
    with pytest.raises(OSError, match=r"not a socket|another server") as info:
        RepairServer(path)
    assert info.value.errno == (errno.EADDRINUSE if kind == "live" else errno.EEXIST)
    assert path.exists()
    if kind == "file":
        assert path.read_text() == "precious"
    live.close()


def test_replaced_file_is_not_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "x.repair"
    server = RepairServer(path)
    path.unlink()
    path.write_text("someone else's")
    server.close()
    assert path.read_text() == "someone else's"


# -- attaching --------------------------------------------------------------------


def test_accept_timeout_says_what_to_do(server: RepairServer) -> None:
    with pytest.raises(NoHelperError, match=f"passt-repair {server.path}"):
        server.accept(timeout=0.05)


def test_switch_without_helper(server: RepairServer, pairs: TcpPairs) -> None:
    with pytest.raises(NoHelperError):
        server.switch(pairs.make(1), Command.ON)


def test_accept_logs_helper(server: RepairServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="passt_repair.server")
    helper = Helper(server.path)
    info = server.accept(timeout=10)
    assert info.uid == 0
    assert f"pid {info.pid}" in caplog.text
    assert os.path.basename(os.readlink(f"/proc/{info.pid}/exe")).startswith("python")
    server.detach()
    assert helper.wait() == 0


def test_second_helper_is_rejected_first_keeps_working(
    server: RepairServer, pairs: TcpPairs, caplog: pytest.LogCaptureFixture
) -> None:
    first = attach(server)
    second = Helper(server.path)
    socks = pairs.make(2)
    # The second helper waits in the listen backlog until a step of the server rejects it.
    deadline = time.monotonic() + 10
    while second.proc.poll() is None and time.monotonic() < deadline:
        server.switch(socks[:1], Command.ON)
        time.sleep(0.05)
    assert second.wait() == 0  # it saw end of file
    assert "rejected a second helper" in caplog.text
    server.switch(socks, Command.OFF_NO_WP)
    assert states(socks) == [0, 0]
    assert server.helper is not None
    assert server.helper.pid == first.pid
    server.detach()
    assert first.wait() == 0


# -- switching ---------------------------------------------------------------------


def test_switch_objects_and_descriptors_in_batches(server: RepairServer, pairs: TcpPairs) -> None:
    helper = attach(server, "--debug")
    socks = pairs.make(600)
    mixed: list[socket.socket | int] = [s if i % 2 else s.fileno() for i, s in enumerate(socks)]
    server.switch(mixed, Command.ON)
    assert states(socks) == [1] * 600
    server.switch(iter(mixed), Command.OFF)
    assert states(socks) == [0] * 600
    server.detach()
    assert helper.wait() == 0
    assert debug_counts(helper) == [("ON", 253), ("ON", 253), ("ON", 94), ("OFF", 253), ("OFF", 253), ("OFF", 94)]


def test_queue_and_flush(server: RepairServer, pairs: TcpPairs) -> None:
    helper = attach(server, "--debug")
    socks = pairs.make(260)
    for s in socks[:254]:
        server.queue(s, Command.ON)  # the 253rd goes out at once
    assert server.queued == 1
    assert states(socks[:253]) == [1] * 253
    assert repair_state(socks[253]) is False
    server.queue(socks[0], Command.OFF_NO_WP)  # a command change sends what was queued
    assert repair_state(socks[253]) is True
    assert server.queued == 1
    server.flush()
    assert server.queued == 0
    assert repair_state(socks[0]) is False
    server.flush()  # nothing queued: nothing sent
    server.detach()
    assert helper.wait() == 0
    assert debug_counts(helper) == [("ON", 253), ("ON", 1), ("OFF_NO_WP", 1)]


def test_repair_context_manager(server: RepairServer, pairs: TcpPairs) -> None:
    attach(server)
    socks = pairs.make(300)
    with server.repair(socks) as inside:
        assert inside == socks
        assert states(socks) == [1] * 300
    assert states(socks) == [0] * 300
    seen_inside: list[int] = []

    def fail_inside() -> None:
        with server.repair(socks, off=Command.OFF_NO_WP):
            seen_inside.extend(states(socks))
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_inside()
    assert seen_inside == [1] * 300
    assert states(socks) == [0] * 300


def test_refused_request_closes_and_reports(server: RepairServer, pairs: TcpPairs) -> None:
    """A socket the helper cannot switch: it refuses the whole message and exits; we say which batch."""
    helper = attach(server)
    socks = pairs.make(300)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    items: list[socket.socket] = [*socks, udp]
    with pytest.raises(HelperGoneError, match="refused the request") as info:
        server.switch(items, Command.ON)
    assert info.value.confirmed == 253
    assert info.value.uncertain == tuple(s.fileno() for s in items[253:])
    assert not server.attached
    assert states(socks) == [1] * 253 + [0] * 47  # the second message changed nothing
    assert helper.wait() == 1
    # A fresh helper puts things right.
    attach(server)
    server.switch(socks[:253], Command.OFF)
    assert states(socks) == [0] * 300
    udp.close()


def test_repair_context_reports_sockets_left_on(server: RepairServer, pairs: TcpPairs) -> None:
    attach(server)
    socks = pairs.make(254)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    with pytest.raises(RepairError, match="253 sockets switched on before it are still in repair mode"):  # noqa: SIM117
        with server.repair([*socks[:253], listening]):
            pytest.fail("the block must not run")
    assert states(socks[:253]) == [1] * 253
    listening.close()
