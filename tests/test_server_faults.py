# SPDX-License-Identifier: GPL-2.0-or-later
"""Faults on the server side: a helper that dies, hangs or lies, a socket file that goes away, helpers that race.

The server is the library's RepairServer; the helper is the installed
passt-repair, or, where a test needs a helper that misbehaves, a raw UNIX
socket client standing in for one. Every outcome is read back from the
kernel (TCP_REPAIR with getsockopt) or from the processes themselves.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from passt_repair.protocol import SCM_MAX_FD, Command
from passt_repair.server import (
    HelperGoneError,
    NoHelperError,
    RepairServer,
    RepairTimeoutError,
    WrongReplyError,
    repair_state,
)
from support import CONNECT, RECVMSG, FakeHelper, Helper, TcpPairs, error_lines, have, states, syscall

ON, OFF = Command.ON, Command.OFF


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "app.repair"


def debug_requests(helper: Helper) -> int:
    """How many requests the helper served, from its --debug log."""
    return sum(1 for line in helper.stderr.splitlines() if re.search(r" sockets? in ", line))


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


# -- the helper is killed ------------------------------------------------------------


@pytest.mark.skipif(not have("strace"), reason="needs strace")
def test_helper_killed_in_the_middle_of_a_batch(path: Path, pairs: TcpPairs) -> None:
    """SIGKILL while the helper works through the second batch: the call raises at once, names the batch
    in doubt, its sockets are found half switched with repair_state, and a fresh helper finishes the job."""
    socks = pairs.make(300)
    fds = [s.fileno() for s in socks]
    # Every setsockopt of the second batch takes 50 ms, so the kill lands in its middle.
    slow_second_batch = [
        "strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=setsockopt",
        "-e", f"inject=setsockopt:delay_enter=50000:when={SCM_MAX_FD + 1}+",
    ]  # fmt: skip
    reply_timeout = 30.0
    with RepairServer(path, reply_timeout=reply_timeout) as server:
        first = Helper(str(path), prefix=slow_second_batch)
        info = server.accept(timeout=20)
        first.pid = info.pid

        def kill_halfway() -> None:
            wait_until(lambda: sum(states(socks[SCM_MAX_FD:])) >= 5, "the second batch is under way")
            os.kill(info.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_halfway)
        killer.start()
        started = time.monotonic()
        try:
            with pytest.raises(HelperGoneError, match="may or may not be switched") as raised:
                server.switch(socks, ON)
            elapsed = time.monotonic() - started
        finally:
            killer.join()
        error = raised.value
        assert elapsed < reply_timeout  # the closed connection is seen at once, not after the timeout
        assert not server.attached
        assert error.confirmed == SCM_MAX_FD
        assert error.uncertain == tuple(fds[SCM_MAX_FD:])
        assert error.helper is not None
        assert error.helper.pid == info.pid
        assert first.wait() != 0  # strace reports the helper's death by signal
        # What the caller learns from repair_state: the confirmed batch is on, the one in doubt is half done.
        assert states(socks[:SCM_MAX_FD]) == [1] * SCM_MAX_FD
        in_doubt = [repair_state(fd) for fd in error.uncertain]
        assert 5 <= sum(in_doubt) < len(in_doubt), in_doubt
        # A fresh helper attaches and finishes the job.
        second = Helper(str(path))
        server.accept(timeout=20)
        server.switch(error.uncertain, ON)
        assert states(socks) == [1] * 300
        server.switch(socks, OFF)
        assert states(socks) == [0] * 300
        server.detach()
        assert second.wait() == 0


def test_helper_killed_while_idle_is_replaced(path: Path, pairs: TcpPairs, caplog: pytest.LogCaptureFixture) -> None:
    """A helper that dies between requests loses nothing: the next switch takes a new helper, or says none came."""
    caplog.set_level(logging.INFO, logger="passt_repair.server")
    socks = pairs.make(3)
    with RepairServer(path, reply_timeout=20) as server:
        first = Helper(str(path))
        info = server.accept(timeout=20)
        server.switch(socks[:1], ON)
        os.kill(info.pid, signal.SIGKILL)
        first.wait()
        second = Helper(str(path))
        wait_until(lambda: syscall(second.pid) == RECVMSG, "the new helper is connected")
        server.attach_timeout = 20
        server.switch(socks[1:2], ON)  # goes to the new helper
        assert server.helper is not None
        assert server.helper.pid == second.pid
        assert f"helper pid {info.pid} closed the connection while idle" in caplog.text
        assert states(socks) == [1, 1, 0]
        os.kill(second.pid, signal.SIGKILL)
        second.wait()
        server.attach_timeout = 0.05
        with pytest.raises(NoHelperError, match="no passt-repair helper connected") as raised:
            server.switch(socks[2:], ON)
        assert raised.value.uncertain == ()
        assert states(socks) == [1, 1, 0]


# -- a helper that hangs or lies (a raw client plays the helper) ------------------------


@pytest.fixture
def fake_server(path: Path) -> Iterator[RepairServer]:
    with RepairServer(path, reply_timeout=0.5) as server:
        yield server


def test_helper_that_never_replies(fake_server: RepairServer, path: Path, pairs: TcpPairs) -> None:
    sock = pairs.make(1)[0]
    fake = FakeHelper(path)
    fake_server.accept(timeout=5)
    result: list[tuple[bytes, list[int]]] = []
    reader = threading.Thread(target=lambda: result.append(fake.request()))
    reader.start()
    with pytest.raises(RepairTimeoutError, match=r"no reply from the helper within 0\.5 s") as raised:
        fake_server.switch([sock], ON)
    reader.join()
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.uncertain == (sock.fileno(),)
    assert f"pid {os.getpid()} may still be switching them" in str(raised.value)  # the fake helper is us
    assert not fake_server.attached
    assert result[0][0] == ON.byte
    assert len(result[0][1]) == 1
    assert fake.closed_by_server()
    fake.close()


@pytest.mark.parametrize("reply", [b"\x00", b"\x02", b"\xff", b"\x01\x01"], ids=["off", "two", "minus-one", "twice"])
def test_helper_that_replies_a_wrong_byte(fake_server: RepairServer, path: Path, pairs: TcpPairs, reply: bytes) -> None:
    sock = pairs.make(1)[0]
    fake = FakeHelper(path)
    fake_server.accept(timeout=5)
    reader = threading.Thread(target=lambda: (fake.request(), fake.sock.send(reply)))
    reader.start()
    with pytest.raises(WrongReplyError, match=re.escape(f"helper replied {reply!r} to command ON")) as raised:
        fake_server.switch([sock], ON)
    reader.join()
    assert raised.value.uncertain == (sock.fileno(),)
    assert not fake_server.attached
    assert fake.closed_by_server()
    fake.close()


def test_helper_that_speaks_unasked(fake_server: RepairServer, path: Path, pairs: TcpPairs) -> None:
    """A correct reply followed by a stray byte: the stray byte must not pass for the next request's reply."""
    socks = pairs.make(2)
    fake = FakeHelper(path)
    fake_server.accept(timeout=5)
    reader = threading.Thread(target=lambda: (fake.request(), fake.sock.send(ON.byte)))
    reader.start()
    fake_server.switch(socks[:1], ON)
    reader.join()
    fake.sock.send(ON.byte)  # a UNIX socket queues it at the server before send() returns
    with pytest.raises(WrongReplyError, match="without a request; nothing was sent") as raised:
        fake_server.switch(socks[1:], ON)
    assert raised.value.uncertain == ()
    assert raised.value.confirmed == 0
    assert not fake_server.attached
    assert fake.closed_by_server()  # and the request was never sent to it
    fake.close()


# -- the socket file ---------------------------------------------------------------------


def test_socket_file_removed(path: Path, pairs: TcpPairs) -> None:
    socks = pairs.make(2)
    with RepairServer(path, reply_timeout=20) as server:
        attached = Helper(str(path))
        server.accept(timeout=20)
        path.unlink()
        server.switch(socks[:1], ON)  # the attached helper does not need the file
        server.detach()
        assert attached.wait() == 0
        with pytest.raises(NoHelperError, match=r"was removed: no helper can connect; call listen\(\)"):
            server.switch(socks[1:], ON)
        with pytest.raises(NoHelperError, match="was removed"):
            server.accept(timeout=5)
        server.listen()
        fresh = Helper(str(path))
        server.accept(timeout=20)
        server.switch(socks[1:], ON)
        assert states(socks) == [1, 1]
    assert fresh.wait() == 0
    assert not path.exists()


@pytest.mark.parametrize("replacement", ["stale socket", "regular file", "live server"])
def test_socket_file_replaced(path: Path, pairs: TcpPairs, replacement: str) -> None:
    """Someone else's file at the path: the server says so, recreates its socket where that is safe,
    and never removes the other file."""
    sock = pairs.make(1)[0]
    other = socket.socket(socket.AF_UNIX)
    with RepairServer(path) as server:
        path.unlink()
        if replacement == "regular file":
            path.write_text("someone else's")
        else:
            other.bind(str(path))
            if replacement == "live server":
                other.listen(1)
            else:
                other.close()
        with pytest.raises(NoHelperError, match="was replaced by another file"):
            server.switch([sock], ON)
        if replacement == "stale socket":
            server.listen()  # nobody listens there: taken over
            helper = Helper(str(path))
            server.accept(timeout=20)
            server.switch([sock], ON)
            assert repair_state(sock)
            server.detach()
            assert helper.wait() == 0
        else:
            with pytest.raises(OSError, match=r"not a socket; refusing|another server is listening"):
                server.listen()
    assert path.exists() == (replacement != "stale socket")  # close() removed ours only
    if replacement == "regular file":
        assert path.read_text() == "someone else's"
    other.close()


# -- two helpers race --------------------------------------------------------------------


@pytest.mark.parametrize("round_", range(3))
def test_two_helpers_racing(path: Path, pairs: TcpPairs, caplog: pytest.LogCaptureFixture, round_: int) -> None:
    """Both connect before the server accepts: one is used, the other is closed and logged."""
    caplog.set_level(logging.INFO, logger="passt_repair.server")
    socks = pairs.make(2)
    with RepairServer(path, reply_timeout=20) as server:
        racers = [Helper("--debug", str(path)) for _ in range(2)]
        # The backlog holds one: the first to connect waits for a request, the other in connect().
        wait_until(lambda: sorted(syscall(h.pid) for h in racers) == [CONNECT, RECVMSG], "both helpers have connected")
        info = server.accept(timeout=20)
        used = next(h for h in racers if h.pid == info.pid)
        other = next(h for h in racers if h is not used)
        # accept() let the other one's connect() finish, and closes it if it is there by then;
        # if not, the next switch does, before any request goes out.
        wait_until(lambda: syscall(other.pid) == RECVMSG or other.proc.poll() is not None, "the other one connects")
        server.switch(socks, ON)
        assert other.wait() == 0
        assert error_lines(other.stderr) == []
        assert f"rejected a second helper: pid {other.pid}" in caplog.text
        assert states(socks) == [1, 1]
        server.detach()
        assert used.wait() == 0
    assert (debug_requests(used), debug_requests(other)) == (1, 0)
