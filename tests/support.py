# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared test tools: real sockets, the installed helper as a subprocess, a raw server.

Nothing here imitates the kernel: every check reads real state back with
getsockopt(TCP_REPAIR) or /proc.
"""

from __future__ import annotations

import array
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from passt_repair.protocol import SCM_MAX_FD, SOL_TCP, TCP_REPAIR

#: The installed console script, next to the interpreter running the tests.
HELPER = Path(sys.executable).with_name("passt-repair")
SETPRIV_NET_ADMIN_ONLY = [
    "setpriv",
    "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
    "--inh-caps=-all,+net_admin",
    "--ambient-caps=-all,+net_admin",
    "--bounding-set=-all,+net_admin",
]
SETPRIV_NO_CAPS = [
    "setpriv",
    "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all",
]


def state(sock: socket.socket | int) -> int:
    """TCP_REPAIR as the kernel has it now (no privilege needed to read it)."""
    if isinstance(sock, int):
        view = socket.socket(fileno=sock)
        try:
            return view.getsockopt(SOL_TCP, TCP_REPAIR)
        finally:
            view.detach()
    return sock.getsockopt(SOL_TCP, TCP_REPAIR)


def states(socks: Sequence[socket.socket]) -> list[int]:
    return [state(s) for s in socks]


class TcpPairs:
    """Connected loopback TCP pairs; `clients` are the sockets to switch."""

    def __init__(self, family: socket.AddressFamily = socket.AF_INET) -> None:
        self.family = family
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(4096)
        self.clients: list[socket.socket] = []
        self.peers: list[socket.socket] = []

    def make(self, n: int) -> list[socket.socket]:
        made = []
        for _ in range(n):
            c = socket.create_connection(self.listener.getsockname()[:2])
            p, _ = self.listener.accept()
            self.clients.append(c)
            self.peers.append(p)
            made.append(c)
        return made

    def close(self) -> None:
        for s in self.clients + self.peers:
            s.close()
        self.listener.close()


class RawServer:
    """A server that sends whatever a test wants: any payload, any descriptors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.conn: socket.socket | None = None

    def accept(self, timeout: float = 10.0) -> socket.socket:
        self.listener.settimeout(timeout)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(timeout)
        return self.conn

    @property
    def peer_pid(self) -> int:
        assert self.conn is not None
        pid, _, _ = array.array("i", self.conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid

    def send(self, payload: bytes, fds: Sequence[int] = ()) -> None:
        assert self.conn is not None
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.conn.sendmsg([payload], anc)

    def request(self, command: int, fds: Sequence[int]) -> bytes:
        """Send one request; return the reply (b'' when the helper closed instead)."""
        self.send((command & 0xFF).to_bytes(1, "little"), fds)
        assert self.conn is not None
        try:
            return self.conn.recv(16)
        except ConnectionResetError:
            return b""

    def closed_without_reply(self) -> bool:
        """Whether the helper closed the connection (end of file or reset) instead of replying."""
        assert self.conn is not None
        try:
            return self.conn.recv(16) == b""
        except ConnectionResetError:
            return True  # it closed with our unread bytes still queued on its side

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


class Helper:
    """The installed passt-repair, started as a subprocess.

    With `trace_exit`, it runs under strace with its exit_group() delayed, so
    the test can read /proc/PID/fd after the helper has handled everything
    and before the kernel closes what it still holds.
    """

    EXIT_DELAY_US = 1_000_000

    def __init__(
        self,
        *args: str,
        prefix: Sequence[str] = (),
        trace_exit: bool = False,
        nofile: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        argv = [*prefix, str(HELPER), *args]
        if trace_exit:
            argv = [
                "strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=exit_group",
                "-e", f"inject=exit_group:delay_enter={self.EXIT_DELAY_US}", *argv,
            ]  # fmt: skip

        def limit() -> None:
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit, env=env)
        self.pid = self.proc.pid  # the helper's own pid, once known, replaces strace's
        self.stdout = ""
        self.stderr = ""

    def fds(self, pid: int | None = None) -> set[int]:
        """The descriptors open in the helper now."""
        return {int(n) for n in os.listdir(f"/proc/{pid or self.pid}/fd")}

    def wait_exiting(self, pid: int, timeout: float = 10.0) -> None:
        """Wait until the traced helper sits in its delayed exit_group()."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                status = Path(f"/proc/{pid}/status").read_text()
                if "State:\tt (tracing stop)" in status or "(tracing stop)" in status:
                    syscall = Path(f"/proc/{pid}/syscall").read_text().split()
                    if syscall and syscall[0] in ("231", "94"):  # exit_group on x86_64, aarch64
                        return
            time.sleep(0.01)
        raise TimeoutError("helper did not reach exit_group")

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the helper to exit; return its exit status (again on later calls)."""
        if self.proc.returncode is None or not self.proc.stdout or not self.proc.stdout.closed:
            out, err = self.proc.communicate(timeout=timeout)
            self.stdout, self.stderr = out.decode(), err.decode()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.communicate()

    def cpu_seconds(self, pid: int | None = None) -> float:
        fields = Path(f"/proc/{pid or self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks


def error_lines(stderr: str) -> list[str]:
    """The lines of the helper's stderr other than the connection notice."""
    return [line for line in stderr.splitlines() if " connected to " not in line]


def assert_clean_stderr(stderr: str) -> None:
    assert "Traceback" not in stderr
    for line in stderr.splitlines():
        assert line.startswith("passt-repair: "), line


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


@contextlib.contextmanager
def raw_server_with_helper(
    tmp_path: Path, *args: str, prefix: Sequence[str] = (), trace_exit: bool = False, nofile: int | None = None
) -> Iterator[tuple[RawServer, Helper]]:
    server = RawServer(tmp_path / "s.repair")
    helper = Helper(*args, str(server.path), prefix=prefix, trace_exit=trace_exit, nofile=nofile)
    try:
        server.accept()
        helper.pid = server.peer_pid
        wait_serving(helper.pid)
        yield server, helper
    finally:
        server.close()
        try:
            helper.wait(timeout=10)
        finally:
            helper.kill()


class FakeHelper:
    """A UNIX socket client that connects like a helper and answers whatever the test says (or nothing)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(20)

    def request(self) -> tuple[bytes, list[int]]:
        """Read one request; return its payload and the descriptors it carried (closed here)."""
        data, ancillary, _, _ = self.sock.recvmsg(16, socket.CMSG_SPACE(SCM_MAX_FD * 4))
        fds = array.array("i")
        for _, _, payload in ancillary:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        for fd in fds:
            os.close(fd)
        return data, fds.tolist()

    def answer(self, reply: bytes) -> None:
        """Read one request, then send `reply` for it."""
        self.request()
        self.sock.send(reply)

    def closed_by_server(self) -> bool:
        """Whether the server closed the connection, with nothing (no request) left to read."""
        try:
            return self.sock.recv(16) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


# x86_64 system call numbers, as /proc/PID/syscall shows them
CONNECT, RECVMSG = "42", "47"


def wait_serving(pid: int, timeout: float = 10.0) -> None:
    """Wait until the helper, connected, has confined itself and waits for a request (or has exited).

    It confines itself after the server's accept(), so a test that reads its
    state (descriptors, capabilities) right after accept() would see it halfway.
    """
    deadline = time.monotonic() + timeout
    while (now := syscall(pid)) not in (RECVMSG, "gone", "-1"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"helper {pid} never waited for a request (in system call {now})")
        time.sleep(0.001)


def syscall(pid: int) -> str:
    """The system call the process is blocked in now ("running" if none, "-1" once it is exiting)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "gone"
