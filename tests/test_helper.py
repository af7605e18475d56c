# SPDX-License-Identifier: GPL-2.0-or-later
"""Conformance of the installed passt-repair helper, on real sockets.

The server side here is a raw UNIX socket that sends exactly what each test
wants. Every outcome is read back from the kernel: TCP_REPAIR with
getsockopt(), the helper's descriptors in /proc/PID/fd.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from passt_repair import hardening
from passt_repair import helper as helper_module
from passt_repair.protocol import SCM_MAX_FD, SOL_TCP, TCP_REPAIR, Command
from support import (
    HELPER,
    Helper,
    RawServer,
    TcpPairs,
    assert_clean_stderr,
    error_lines,
    raw_server_with_helper,
    state,
    states,
)

ON, OFF, OFF_NO_WP = Command.ON, Command.OFF, Command.OFF_NO_WP


def set_states(socks: list[socket.socket], values: list[int]) -> None:
    """Put sockets into given repair states directly (the test runs as root)."""
    for s, v in zip(socks, values, strict=True):
        s.setsockopt(SOL_TCP, TCP_REPAIR, 1 if v else -1)


def mixed(n: int) -> list[int]:
    """Repair states for n sockets, some on and some off."""
    return [int(i % 3 == 0) for i in range(n)]


# -- what a correct server sees ---------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 252, 253])
@pytest.mark.parametrize("command", [ON, OFF, OFF_NO_WP])
def test_switch(tmp_path: Path, pairs: TcpPairs, n: int, command: Command) -> None:
    socks = pairs.make(n)
    set_states(socks, [command != ON] * n)
    with raw_server_with_helper(tmp_path) as (server, helper):
        idle = helper.fds()
        assert server.request(command, [s.fileno() for s in socks]) == command.byte
        assert states(socks) == [int(command == ON)] * n
        assert helper.fds() == idle  # every received descriptor closed
    assert helper.wait() == 0


def test_message_sizes_go_up_and_down(tmp_path: Path, pairs: TcpPairs) -> None:
    socks = pairs.make(253)
    with raw_server_with_helper(tmp_path) as (server, helper):
        idle = helper.fds()
        for i, n in enumerate([1, 253, 2, 252, 7, 253, 1, 100, 253, 3]):
            command = ON if i % 2 == 0 else OFF_NO_WP
            before = states(socks)
            assert server.request(command, [s.fileno() for s in socks[:n]]) == command.byte
            assert states(socks) == [int(command == ON)] * n + before[n:]
            assert helper.fds() == idle
        assert server.conn is not None
        server.conn.close()
        assert helper.wait() == 0


def test_ten_thousand_sockets_through_one_helper(tmp_path: Path) -> None:
    """10,000 connected sockets; their peers live in another process (20,000 descriptors do not fit one)."""
    count = 10_000
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER_HOLDER, str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert peer.stdout is not None
    assert peer.stdin is not None
    port = int(peer.stdout.readline())
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port)))
        with raw_server_with_helper(tmp_path) as (server, helper):
            idle = helper.fds()
            for command in (ON, OFF_NO_WP):
                for i in range(0, count, 253):
                    batch = socks[i : i + 253]
                    assert server.request(command, [s.fileno() for s in batch]) == command.byte
                assert states(socks) == [int(command == ON)] * count
            assert helper.fds() == idle
    finally:
        for s in socks:
            s.close()
        peer.stdin.close()
        peer.wait()


PEER_HOLDER = """
import socket, sys
n = int(sys.argv[1])
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(4096)
print(l.getsockname()[1], flush=True)
held = [l.accept()[0] for _ in range(n)]
sys.stdin.read()
"""


# -- what a broken or hostile server sends ----------------------------------


def _run_rejected(
    tmp_path: Path, pairs: TcpPairs, payload: bytes, extra: list[int], position: int, nofile: int | None = None
) -> tuple[Helper, list[socket.socket], list[int]]:
    """Send `payload` with 252 good sockets in mixed states and `extra` inserted at `position`.

    Checks that the helper closed every received descriptor before it exits, and
    that it sent no reply. Returns the helper, the sockets, and their states before.
    """
    socks = pairs.make(252)
    before = mixed(252)
    set_states(socks, before)
    fds = [s.fileno() for s in socks]
    fds[position:position] = extra
    with raw_server_with_helper(tmp_path, trace_exit=True, nofile=nofile) as (server, helper):
        idle = helper.fds()
        pid = helper.pid
        server.send(payload, fds)
        helper.wait_exiting(pid)
        left = helper.fds(pid)
        assert left <= idle, f"descriptors left open in the helper: {sorted(left - idle)}"
        assert server.closed_without_reply()
    return helper, socks, before


def _assert_refused(helper: Helper, fragment: str) -> None:
    assert helper.wait() == 1
    assert_clean_stderr(helper.stderr)
    lines = error_lines(helper.stderr)
    assert len(lines) == 1, helper.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(("command", "position"), [(ON, 0), (OFF, 100), (ON, 252)])
@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("udp", "EOPNOTSUPP"),
        ("unix", "EOPNOTSUPP"),
        ("pipe", "ENOTSOCK"),
        ("listening", "EPERM"),
    ],
)
def test_bad_descriptor_changes_nothing(
    tmp_path: Path, pairs: TcpPairs, kind: str, fragment: str, command: Command, position: int
) -> None:
    """One bad descriptor among 252 good sockets in mixed states: all of them stay as they were.

    A listening socket passes the first read and fails only when set, so the
    sockets before it were switched and must have been put back.
    """
    with _OddDescriptor(kind) as fd:
        helper, socks, before = _run_rejected(tmp_path, pairs, command.byte, [fd], position)
    assert states(socks) == before
    _assert_refused(helper, fragment)
    assert f"descriptor {position + 1} of 253:" in helper.stderr


class _OddDescriptor:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.objects: list[object] = []

    def __enter__(self) -> int:
        if self.kind == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        elif self.kind == "unix":
            s, other = socket.socketpair()
            self.objects.append(other)
        elif self.kind == "listening":
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
        else:
            r, w = os.pipe()
            self.objects += [r, w]
            return r
        self.objects.append(s)
        return s.fileno()

    def __exit__(self, *exc: object) -> None:
        for o in self.objects:
            if isinstance(o, int):
                os.close(o)
            else:
                o.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\x01\x01", "exactly one byte"),
        (b"\x01" * 64, "exactly one byte"),
        (b"\x02", "unsupported command byte 2"),
        (b"\xfe", "unsupported command byte -2"),
        (b"\x7f", "unsupported command byte 127"),
        (b"\x80", "unsupported command byte -128"),
    ],
)
def test_bad_payload_changes_nothing(tmp_path: Path, pairs: TcpPairs, payload: bytes, fragment: str) -> None:
    helper, socks, before = _run_rejected(tmp_path, pairs, payload, [], 0)
    assert states(socks) == before
    _assert_refused(helper, fragment)


def test_no_descriptors(tmp_path: Path) -> None:
    with raw_server_with_helper(tmp_path, trace_exit=True) as (server, helper):
        server.send(ON.byte)
        helper.wait_exiting(helper.pid)
    _assert_refused(helper, "1 to 253 descriptors")


def test_truncated_control_message(tmp_path: Path, pairs: TcpPairs) -> None:
    """The helper's descriptor limit cuts the message short: an error, not a partial success."""
    helper, socks, before = _run_rejected(tmp_path, pairs, ON.byte, [], 0, nofile=64)
    assert states(socks) == before
    _assert_refused(helper, "truncated")


def test_control_message_of_another_kind() -> None:
    """The kernel delivers SCM_CREDENTIALS only to a receiver that asked for them, and the helper
    never does, so no server can make one arrive: the check is exercised directly."""
    assert "other than SCM_RIGHTS" in helper_module._refusal(1, 1, 0, 1, 1)


# -- ending -------------------------------------------------------------------


def test_end_of_file_exits_zero(tmp_path: Path) -> None:
    with raw_server_with_helper(tmp_path) as (server, helper):
        assert server.conn is not None
        server.conn.close()
        assert helper.wait() == 0
    assert error_lines(helper.stderr) == []


def test_connection_reset_exits_zero(tmp_path: Path, pairs: TcpPairs) -> None:
    """Closing with the helper's reply unread resets the helper's end (ECONNRESET)."""
    sock = pairs.make(1)[0]
    with raw_server_with_helper(tmp_path) as (server, helper):
        server.send(ON.byte, [sock.fileno()])
        time.sleep(0.2)
        assert server.conn is not None
        server.conn.close()
        assert helper.wait() == 0
    assert error_lines(helper.stderr) == []
    assert state(sock) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_waiting_ends_quietly(tmp_path: Path, signum: int) -> None:
    with raw_server_with_helper(tmp_path) as (_, helper):
        os.kill(helper.pid, signum)
        assert helper.wait(timeout=5) == 0
    assert error_lines(helper.stderr) == []


def test_signal_during_a_message_finishes_it(tmp_path: Path, pairs: TcpPairs) -> None:
    """SIGTERM while switching: the message is completed and answered, then the helper exits."""
    socks = pairs.make(50)
    server = RawServer(tmp_path / "s.repair")
    slow = [
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "trace=setsockopt",
        "-e",
        "inject=setsockopt:delay_enter=20000",
    ]
    helper = Helper(str(server.path), prefix=slow)
    try:
        server.accept()
        helper.pid = server.peer_pid
        server.send(ON.byte, [s.fileno() for s in socks])
        time.sleep(0.3)  # 50 setsockopt calls of 20 ms each: about a quarter of the way through
        os.kill(helper.pid, signal.SIGTERM)
        assert server.conn is not None
        assert server.conn.recv(1) == ON.byte
        assert states(socks) == [1] * 50
        assert helper.wait(timeout=10) == 0
    finally:
        server.close()
        helper.kill()


# -- command line -------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HELPER), *args], capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("args", [[], ["a", "b"], ["--frobnicate", "x"]])
def test_usage_errors(args: list[str]) -> None:
    r = run_cli(*args)
    assert r.returncode == 2
    assert_clean_stderr(r.stderr)
    assert len(r.stderr.splitlines()) == 1
    assert "usage: passt-repair" in r.stderr


def test_path_too_long(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    path = long_dir / "s.repair"
    server = socket.socket(socket.AF_UNIX)
    os.chdir(long_dir)
    try:
        server.bind("s.repair")  # relative: the full path does not fit sun_path
        r = run_cli(str(path))
    finally:
        os.chdir("/")
        server.close()
    assert r.returncode == 2
    assert "too long" in r.stderr
    assert_clean_stderr(r.stderr)


def test_path_not_a_socket(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    r = run_cli(str(f))
    assert (r.returncode, "not a socket" in r.stderr) == (2, True)
    assert_clean_stderr(r.stderr)


def test_path_missing(tmp_path: Path) -> None:
    r = run_cli(str(tmp_path / "nothing"))
    assert (r.returncode, "ENOENT" in r.stderr) == (1, True)
    assert_clean_stderr(r.stderr)


def test_connection_refused(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "s.repair"))  # bound, never listening
    r = run_cli(str(tmp_path / "s.repair"))
    s.close()
    assert (r.returncode, "ECONNREFUSED" in r.stderr) == (1, True)
    assert_clean_stderr(r.stderr)


def test_help_and_version_match_python_m() -> None:
    for flag in ("--help", "--version"):
        script = run_cli(flag)
        module = subprocess.run([sys.executable, "-m", "passt_repair", flag], capture_output=True, text=True)
        assert script.returncode == module.returncode == 0
        assert script.stdout == module.stdout
        assert script.stdout.strip()
    assert "passt-repair" in run_cli("--version").stdout


# -- directory mode -------------------------------------------------------------


def test_directory_socket_created_later(tmp_path: Path, pairs: TcpPairs) -> None:
    helper = Helper(str(tmp_path))
    try:
        time.sleep(0.3)
        assert helper.proc.poll() is None
        (tmp_path / "other.sock").write_text("")  # not a .repair name: ignored
        server = RawServer(tmp_path / "vm.repair")
        server.accept()
        sock = pairs.make(1)[0]
        assert server.request(ON, [sock.fileno()]) == ON.byte
        assert state(sock) == 1
        server.close()
        assert helper.wait() == 0
    finally:
        helper.kill()


def test_directory_socket_already_there(tmp_path: Path, pairs: TcpPairs) -> None:
    server = RawServer(tmp_path / "vm.repair")
    helper = Helper(str(tmp_path))
    try:
        server.accept(timeout=5)
        sock = pairs.make(1)[0]
        assert server.request(ON, [sock.fileno()]) == ON.byte
        assert state(sock) == 1
        server.close()
        assert helper.wait() == 0
    finally:
        helper.kill()


def test_directory_waits_for_listen_without_burning_cpu(tmp_path: Path) -> None:
    """bind() now, listen() a second later: the helper retries with a back-off, not a spin.

    A spinning helper would use close to a full second of CPU here; the bound is generous.
    """
    path = tmp_path / "vm.repair"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    helper = Helper(str(tmp_path))
    try:
        time.sleep(0.3)  # interpreter start-up, then the helper finds the socket and is refused
        cpu_before = helper.cpu_seconds()
        time.sleep(1.0)
        cpu_during = helper.cpu_seconds() - cpu_before
        listener.listen(1)
        listener.settimeout(5)
        conn, _ = listener.accept()
        assert cpu_during < 0.1, f"helper used {cpu_during:.3f} s of CPU in 1 s of waiting"
        conn.close()
        assert helper.wait() == 0
    finally:
        listener.close()
        helper.kill()


# -- privileges -----------------------------------------------------------------


def test_privilege_split(tmp_path: Path) -> None:
    """The server runs with no capability at all and gets EPERM itself; the helper runs with
    CAP_NET_ADMIN alone and switches the server's socket.

    Both keep uid 0 with SECBIT_NOROOT set, so the interpreter under root's home stays
    reachable while uid 0 confers no capability.
    """
    from support import SETPRIV_NET_ADMIN_ONLY, SETPRIV_NO_CAPS

    path = tmp_path / "s.repair"
    server = subprocess.Popen(
        [*SETPRIV_NO_CAPS, sys.executable, "-c", UNPRIVILEGED_SERVER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    helper = Helper(str(path), prefix=SETPRIV_NET_ADMIN_ONLY)
    out, err = server.communicate(timeout=30)
    helper.wait()
    assert server.returncode == 0, err
    lines = dict(line.split("=", 1) for line in out.split())
    assert lines["server_caps"] == "0000000000000000"
    assert lines["own_setsockopt"] == "EPERM"
    assert lines["helper_caps"] == "0000000000001000"
    assert lines["after_on"] == "1"
    assert lines["after_off"] == "0"


UNPRIVILEGED_SERVER = """
import errno, socket, sys
from passt_repair.server import RepairServer, repair_state
from passt_repair.protocol import Command
caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
print(f"server_caps={caps}")
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen()
c = socket.create_connection(lst.getsockname()); p, _ = lst.accept()
try:
    c.setsockopt(socket.SOL_TCP, 19, 1)
    print("own_setsockopt=ok")
except OSError as e:
    print(f"own_setsockopt={errno.errorcode[e.errno]}")
with RepairServer(sys.argv[1]) as server:
    info = server.accept(timeout=20)
    hcaps = [l.split()[1] for l in open(f"/proc/{info.pid}/status") if l.startswith("CapEff")][0]
    print(f"helper_caps={hcaps}")
    server.switch([c], Command.ON)
    print(f"after_on={int(repair_state(c))}")
    server.switch([c], Command.OFF)
    print(f"after_off={int(repair_state(c))}")
"""


def test_contiguous_descriptors_close_in_one_call(tmp_path: Path, pairs: TcpPairs) -> None:
    """The helper keeps its descriptor table free of holes, so a message's descriptors arrive
    contiguous and go with one close_range(): the cheap path is the one taken, message after message."""
    socks = pairs.make(253)
    trace = tmp_path / "strace.log"
    prefix = ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=recvmsg,close,close_range,sendto"]
    with raw_server_with_helper(tmp_path, prefix=prefix) as (server, helper):
        for command in (ON, OFF_NO_WP, ON, OFF_NO_WP):
            assert server.request(command, [s.fileno() for s in socks]) == command.byte
    assert helper.wait() == 0
    calls = [line.split("(", 1)[0].split()[-1] for line in trace.read_text().splitlines() if "(" in line]
    between = "".join({"recvmsg": "r", "close": "c", "close_range": "R", "sendto": "s"}[c] for c in calls)
    served = between[between.index("r") :]
    assert served.startswith("rRs" * 4 + "r"), calls  # receive, one close_range, reply; four times


def test_helper_commands_are_the_protocols() -> None:
    """The helper keeps its own table of commands (protocol's enum costs 2 ms at start-up): the same."""
    assert {c.byte[0]: int(c) for c in Command} == helper_module._VALUES
    assert {int(c): c.byte for c in Command} == helper_module._REPLIES
    assert {int(c): f"{c.name} ({int(c)})" for c in Command} == helper_module._NAMES
    assert (helper_module.SCM_MAX_FD, helper_module.SOL_TCP, helper_module.TCP_REPAIR) == (
        SCM_MAX_FD,
        SOL_TCP,
        TCP_REPAIR,
    )
    assert set(helper_module.FILTER_ARCHES) == set(hardening.ARCHES)


#: Modules whose import would cost the helper start-up time before it connects (each 0.3 to 3 ms).
SLOW_IMPORTS = {"os", "signal", "enum", "typing", "re", "argparse", "array", "struct", "ctypes", "collections", "site"}


def test_nothing_slow_is_imported_before_connecting(tmp_path: Path) -> None:
    """What the command has imported when it connects: modules written in C, and the helper's own.

    Read by a server that, once the helper connected, looks at the modules of the interpreter the
    launcher started, through a child run exactly as the launcher runs it (-I -S -B) up to connect().
    """
    site = next(p for p in sys.path if p.endswith("site-packages"))
    probe = (
        f"import sys; sys.path.append({site!r}); from passt_repair import cli, helper; "
        "helper.connect(sys.argv[1], helper.stderr_log); print(' '.join(sorted(sys.modules)))"
    )
    server = RawServer(tmp_path / "s.repair")
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", probe, str(server.path)], stdout=subprocess.PIPE
        )
        server.accept()
        out, _ = child.communicate(timeout=20)
    finally:
        server.close()
    loaded = set(out.decode().split())
    assert "passt_repair.helper" in loaded
    assert loaded & SLOW_IMPORTS == set()
    assert {m for m in loaded if m.startswith("passt_repair")} == {
        "passt_repair",
        "passt_repair.cli",
        "passt_repair.helper",
    }
