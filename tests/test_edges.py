# SPDX-License-Identifier: GPL-2.0-or-later
"""The installed helper at its edges: signals whatever it waits on, logging that fails, names that
would forge log lines, and the ways a directory wait can go wrong."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from passt_repair.protocol import Command
from support import (
    HELPER,
    RECVMSG,
    Helper,
    RawServer,
    TcpPairs,
    assert_clean_stderr,
    error_lines,
    raw_server_with_helper,
    state,
    states,
    syscall,
    wait_serving,
)

ON, OFF = Command.ON, Command.OFF
SENDTO, READ, CONNECT = "44", "0", "42"


def wait_in(pid: int, call: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while syscall(pid) != call:
        if time.monotonic() > deadline:
            raise TimeoutError(f"helper never blocked in system call {call} (now {syscall(pid)})")
        time.sleep(0.002)


def ended_within(proc: subprocess.Popen[bytes], seconds: float) -> float:
    """Seconds from now until `proc` has exited (fails past `seconds`)."""
    start = time.monotonic()
    proc.wait(timeout=seconds + 5)
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"took {elapsed * 1000:.0f} ms"
    return elapsed


# -- signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_blocked_sending_to_a_server_that_stopped_reading(
    tmp_path: Path, pairs: TcpPairs, signum: int
) -> None:
    """The server sends requests and never reads the replies: the helper fills its send buffer and
    blocks in send(); a signal still ends it within 100 ms, with status 0."""
    sock = pairs.make(1)[0]
    with raw_server_with_helper(tmp_path) as (server, helper):
        assert server.conn is not None
        server.conn.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 20
        while syscall(helper.pid) != SENDTO and time.monotonic() < deadline:
            try:
                server.send((ON if sent % 2 else OFF).byte, [sock.fileno()])
                sent += 1
            except BlockingIOError:
                time.sleep(0.001)
        wait_in(helper.pid, SENDTO)
        os.kill(helper.pid, signum)
        ended_within(helper.proc, 0.1)
        assert helper.proc.returncode == 0
    assert_clean_stderr(helper.stderr)
    assert error_lines(helper.stderr) == []


@pytest.mark.parametrize(
    ("where", "call"),
    [("request", RECVMSG), ("directory", READ), ("backlog", CONNECT)],
)
def test_signal_ends_any_wait_within_100_ms(tmp_path: Path, where: str, call: str) -> None:
    """Waiting for a request, for a socket to appear, and in connect() to a server whose backlog is full."""
    server = RawServer(tmp_path / "s.repair")
    server.listener.listen(0)
    blocker = None
    if where == "backlog":
        blocker = socket.socket(socket.AF_UNIX)
        blocker.connect(str(server.path))  # fills the backlog of 0 (one pending connection is allowed)
    target = str(tmp_path / "empty") if where == "directory" else str(server.path)
    if where == "directory":
        os.mkdir(target)
    helper = Helper(target)
    try:
        if where == "request":
            server.accept()
            helper.pid = server.peer_pid
        wait_in(helper.pid, call)
        os.kill(helper.pid, signal.SIGTERM)
        ended_within(helper.proc, 0.1)
        assert helper.wait() == 0
    finally:
        helper.kill()
        server.close()
        if blocker is not None:
            blocker.close()
    assert error_lines(helper.stderr) == []


def test_sigint_storm_while_switching(tmp_path: Path, pairs: TcpPairs) -> None:
    """SIGINT every 50 us while 253-socket requests go back and forth: the helper ends with status 0,
    no traceback, and every request was applied to all of its sockets or to none."""
    socks = pairs.make(253)
    fds = [s.fileno() for s in socks]
    with raw_server_with_helper(tmp_path) as (server, helper):
        stop = threading.Event()

        def storm() -> None:
            while not stop.is_set():
                try:
                    os.kill(helper.pid, signal.SIGINT)
                except ProcessLookupError:
                    return
                time.sleep(50e-6)

        thread = threading.Thread(target=storm)
        replies = 0
        command = ON
        thread.start()
        try:
            for _ in range(2000):
                command = OFF if command == ON else ON
                try:
                    if server.request(command, fds) != command.byte:
                        break
                except BrokenPipeError:  # the helper had ended before this request
                    break
                replies += 1
                assert states(socks) == [int(command == ON)] * 253
        finally:
            stop.set()
            thread.join()
        assert helper.wait() == 0
        assert len(set(states(socks))) == 1  # the last request too: all or nothing
    assert_clean_stderr(helper.stderr)
    assert error_lines(helper.stderr) == []


# -- logging never stops service ---------------------------------------------------------


def _serve_with_stderr(tmp_path: Path, pairs: TcpPairs, stderr: int, *args: str) -> int:
    server = RawServer(tmp_path / "s.repair")
    sock = pairs.make(1)[0]
    proc = subprocess.Popen([str(HELPER), *args, str(server.path)], stderr=stderr)
    try:
        server.accept()
        for command in (ON, OFF, ON):
            assert server.request(command, [sock.fileno()]) == command.byte
        assert state(sock) == 1
        server.close()
        return proc.wait(timeout=20)
    finally:
        server.close()
        proc.kill()
        proc.wait()


def test_stderr_on_a_full_disk(tmp_path: Path, pairs: TcpPairs) -> None:
    with open("/dev/full", "wb") as full:
        assert _serve_with_stderr(tmp_path, pairs, full.fileno(), "--debug") == 0


def test_log_pipe_whose_reader_has_gone(tmp_path: Path, pairs: TcpPairs) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        assert _serve_with_stderr(tmp_path, pairs, write_end, "--debug") == 0
    finally:
        os.close(write_end)


# -- names from the server or the file system are escaped -----------------------------------


def test_server_chosen_name_cannot_forge_log_lines(tmp_path: Path, pairs: TcpPairs) -> None:
    """The socket's name carries a terminal title escape and a newline with a forged error line."""
    directory = Path(tempfile.mkdtemp(dir="/tmp"))  # short: the name must fit in sun_path
    name = "x\x1b]0;owned\x07\npasst-repair: error: forged.repair"
    server = RawServer(directory / name)
    helper = Helper("--debug", str(directory))
    try:
        server.accept()
        sock = pairs.make(1)[0]
        assert server.request(ON, [sock.fileno()]) == ON.byte
        server.close()
        assert helper.wait() == 0
    finally:
        server.close()
        helper.kill()
        shutil.rmtree(directory)
    lines = helper.stderr.splitlines()
    assert len(lines) == 2  # connected, and the --debug line
    assert "\x1b" not in helper.stderr
    assert "\x07" not in helper.stderr
    assert not any(line.startswith("passt-repair: error") for line in lines)
    assert "\\x1b]0;owned\\x07\\npasst-repair: error: forged.repair" in lines[0]


# -- directory mode ------------------------------------------------------------------------


def _waiting(helper: Helper) -> None:
    """Until the helper sleeps in its inotify read()."""
    wait_in(helper.pid, READ)


def test_inotify_queue_overflow_rescans(tmp_path: Path, pairs: TcpPairs) -> None:
    """More entries than the kernel queues events for, while the helper is stopped, then the socket:
    its event is lost in the overflow, and the helper finds it by reading the directory again."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    directory = tmp_path / "d"
    directory.mkdir()
    helper = Helper(str(directory))
    try:
        _waiting(helper)
        os.kill(helper.pid, signal.SIGSTOP)
        for i in range(limit + 500):
            os.close(os.open(directory / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600))
        server = RawServer(directory / "late.repair")
        os.kill(helper.pid, signal.SIGCONT)
        server.accept(timeout=10)
        sock = pairs.make(1)[0]
        assert server.request(ON, [sock.fileno()]) == ON.byte
        server.close()
        assert helper.wait() == 0
    finally:
        helper.kill()
    assert error_lines(helper.stderr) == []


@pytest.mark.parametrize("how", ["removed", "renamed", "replaced"])
def test_watched_directory_gone(tmp_path: Path, how: str) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    helper = Helper(str(directory))
    try:
        _waiting(helper)
        if how == "removed":
            directory.rmdir()
        elif how == "renamed":
            directory.rename(tmp_path / "elsewhere")
        else:
            (tmp_path / "new").mkdir()
            (tmp_path / "new").rename(directory)
        ended_within(helper.proc, 5)
        assert helper.wait() == 1
    finally:
        helper.kill()
    assert helper.stderr == (
        f"passt-repair: error: the directory {directory} was deleted, moved or unmounted while waiting in it\n"
    )


def test_stale_socket_is_named_once(tmp_path: Path, pairs: TcpPairs) -> None:
    """A .repair socket nobody listens on: one line after about a second, then the helper keeps waiting
    (at most 100 attempts a second) and connects once the server listens."""
    directory = tmp_path / "d"
    directory.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(directory / "old.repair"))
    helper = Helper(str(directory))
    line = f"passt-repair: waiting: {directory}/old.repair refuses connections"
    try:
        time.sleep(2.5)
        assert helper.proc.poll() is None
        assert helper.cpu_seconds() < 0.5  # retries every 10 ms at most: no spinning
        stale.listen(1)
        conn, _ = stale.accept()
        conn.close()
        assert helper.wait() == 0
    finally:
        helper.kill()
        stale.close()
    assert helper.stderr.count(line) == 1
    assert helper.stderr.splitlines()[0].startswith(line)


def test_timeout_in_directory_mode(tmp_path: Path) -> None:
    started = time.monotonic()
    r = subprocess.run([str(HELPER), "--timeout", "0.3", str(tmp_path)], capture_output=True, text=True, timeout=20)
    elapsed = time.monotonic() - started
    assert r.returncode == 1
    assert r.stderr == "passt-repair: error: nothing to connect to within 0.3 s (--timeout)\n"
    assert 0.3 <= elapsed < 5


def test_timeout_does_not_touch_a_connected_helper(tmp_path: Path, pairs: TcpPairs) -> None:
    with raw_server_with_helper(tmp_path, "--timeout", "0.2") as (server, helper):
        time.sleep(0.5)
        sock = pairs.make(1)[0]
        assert server.request(ON, [sock.fileno()]) == ON.byte
        assert syscall(helper.pid) in (RECVMSG, "running")
    assert helper.wait() == 0
    assert error_lines(helper.stderr) == []


def test_directory_socket_already_there_connects_before_any_watch(tmp_path: Path) -> None:
    """The fast path: a .repair socket already there is connected to before inotify (and ctypes) is set up."""
    server = RawServer(tmp_path / "s.repair")
    helper = Helper(str(tmp_path))
    try:
        server.accept()
        wait_serving(server.peer_pid)
        fdinfo = Path(f"/proc/{server.peer_pid}/fdinfo")
        assert not any("inotify" in (fdinfo / n).read_text() for n in os.listdir(fdinfo))
        server.close()
        assert helper.wait() == 0
    finally:
        server.close()
        helper.kill()
