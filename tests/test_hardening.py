# SPDX-License-Identifier: GPL-2.0-or-later
"""The helper's confinement, read back from the kernel: /proc/PID/status, SIGSYS, SO_PEERCRED.

Every helper here is the installed passt-repair, started as root (or with
fewer privileges through setpriv), so what is checked is what ships. The
filter's own tests install it in a child process that imports
passt_repair.hardening, as the helper does; nothing in the helper exists
for tests.
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from passt_repair import cli, hardening, helper
from passt_repair.protocol import Command
from support import (
    SETPRIV_NET_ADMIN_ONLY,
    SETPRIV_NO_CAPS,
    Helper,
    RawServer,
    TcpPairs,
    assert_clean_stderr,
    error_lines,
    raw_server_with_helper,
    state,
)

ON, OFF = Command.ON, Command.OFF
NET_ADMIN_ONLY = "0000000000001000"
NET_ADMIN_AND_DAC_OVERRIDE = "0000000000001002"
NOBODY = 65534


def proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def confinement(pid: int) -> dict[str, str]:
    status = proc_status(pid)
    keys = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
    return {k: status[k].strip() for k in keys}


def wait_for(predicate: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise TimeoutError(what)


def innermost(pid: int) -> int:
    """The process at the bottom of a chain of wrappers (setpriv, strace) started as `pid`."""
    while children := Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pid = int(children[0])
    return pid


def no_connection_made(listener: socket.socket) -> bool:
    """Whether nothing ever connected to `listener` (a connection would wait in its backlog)."""
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def helper_command(*args: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return [*prefix, str(Path(sys.executable).with_name("passt-repair")), *args]


# -- one source for the allow-list --------------------------------------------


def _annotated(module: object, marker: str = "#syscalls:") -> set[str]:
    source = Path(module.__file__).read_text()  # type: ignore[attr-defined]
    return {name for line in re.findall(re.escape(marker) + r"([^\n\"]*)", source) for name in line.split()}


def test_annotations_and_allow_list_are_the_same() -> None:
    """Every system call annotated on code that runs under the filter is allowed, and every allowed
    call is either annotated where the table says or belongs to the interpreter."""
    annotated = _annotated(helper) | _annotated(cli)
    from_code = {s.name for s in hardening.ALLOWED if s.where != "interpreter"}
    assert annotated == from_code
    for entry in hardening.ALLOWED:
        if entry.where == "interpreter":
            continue
        module_name, *path = entry.where.split(".")
        target: object = {"helper": helper, "cli": cli}[module_name]
        for part in path:
            target = getattr(target, part)
        doc = target.__doc__ or ""
        annotation = doc.split("#syscalls:", 1)[1].split("\n", 1)[0] if "#syscalls:" in doc else ""
        assert entry.name in annotation.split(), f"{entry.where} does not annotate {entry.name}"
        assert entry.why


def test_security_doc_lists_the_allow_list() -> None:
    doc = Path(__file__).parents[1] / "docs" / "SECURITY.md"
    listed = re.findall(r"^\| `(\w+)` \|", doc.read_text(), re.MULTILINE)
    assert listed == [s.name for s in hardening.ALLOWED]


def _header_numbers(path: Path) -> dict[str, int]:
    """__NR_name values in a kernel header, following the asm-generic __NR3264_ aliases."""
    text = path.read_text()
    raw: dict[str, str] = dict(re.findall(r"#define (__NR3264_\w+|__NR_\w+)\s+(\w+)", text))
    numbers: dict[str, int] = {}
    for name, value in raw.items():
        resolved = raw.get(value, value)
        if name.startswith("__NR_") and resolved.isdigit():
            numbers.setdefault(name[len("__NR_") :], int(resolved))
    return numbers


def test_syscall_numbers_match_the_kernel_headers() -> None:
    headers = {
        "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
        "aarch64": Path("/usr/include/asm-generic/unistd.h"),
    }
    for arch, header in headers.items():
        if not header.exists():
            pytest.skip(f"{header} missing (linux-libc-dev)")
        numbers = _header_numbers(header)
        for entry in hardening.ALLOWED:
            assert (entry.x86_64 if arch == "x86_64" else entry.aarch64) == numbers[entry.name], (arch, entry.name)
        assert hardening.ARCHES[arch].seccomp_nr == numbers["seccomp"]


# -- the filter program, for an architecture this machine cannot run ------------


def _run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """Evaluate a seccomp program on one struct seccomp_data (only the instructions it uses)."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    code = [hardening.INSTRUCTION.unpack_from(program, i) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
        elif op == 0x06:
            return int(k)
        else:
            taken = {0x15: acc == k, 0x35: acc >= k}[op]
            pc += jt if taken else jf


@pytest.mark.parametrize("arch", list(hardening.ARCHES.values()), ids=list(hardening.ARCHES))
def test_filter_program_decides_by_arch_number_and_arguments(arch: hardening.Arch) -> None:
    """The program this machine installs is tested for real below; this covers the other architecture's
    numbers and the argument tests, on the same program bytes the helper would install there."""
    program = hardening.assemble(arch)
    allow, kill = hardening.SECCOMP_RET_ALLOW, hardening.SECCOMP_RET_KILL_PROCESS
    plain = {s.number(arch) for s in hardening.ALLOWED if not s.only}
    for nr in range(600):
        expected = allow if nr in plain else kill  # calls with argument tests fail them with zeros
        assert _run_bpf(program, nr, arch.audit) == expected, nr
    setsockopt = next(s for s in hardening.ALLOWED if s.name == "setsockopt")
    nr = setsockopt.number(arch)
    assert _run_bpf(program, nr, arch.audit, (3, 6, 19, 0, 4, 0)) == allow
    assert _run_bpf(program, nr, arch.audit, (3, 6, 19 | 1 << 32, 0, 4, 0)) == allow  # an int: low half only
    assert _run_bpf(program, nr, arch.audit, (3, 1, 19, 0, 4, 0)) == kill  # SOL_SOCKET
    assert _run_bpf(program, nr, arch.audit, (3, 6, 20, 0, 4, 0)) == kill  # TCP_REPAIR_QUEUE
    mmap = next(s for s in hardening.ALLOWED if s.name == "mmap").number(arch)
    assert _run_bpf(program, mmap, arch.audit, (0, 1 << 20, 3, 0x22, -1 & 0xFFFFFFFF, 0)) == allow  # read-write
    assert _run_bpf(program, mmap, arch.audit, (0, 4096, 7, 0x22, 0, 0)) == kill  # read-write-execute
    assert _run_bpf(program, mmap, arch.audit, (0, 4096, 5, 0x22, 0, 0)) == kill  # read-execute
    for other in hardening.ARCHES.values():
        if other != arch:
            assert _run_bpf(program, hardening.ALLOWED[0].number(arch), other.audit) == kill
    assert _run_bpf(program, 0x40000000 | 44, arch.audit) == kill  # x32 sendto (on x86_64)


# -- the filter, installed ----------------------------------------------------------

FILTERED_CHILD = r"""
import ctypes, mmap, os, socket, sys
from passt_repair import hardening, helper

path, then = sys.argv[1], sys.argv[2]
hardening.lock_down()
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
# An i386 system call (int 0x80) made from this 64-bit process: mov eax, 55 (i386 fcntl); int 0x80; ret.
code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
code.write(bytes.fromhex("b837000000cd80c3"))
i386_call = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(path)
if then != "i386 unfiltered":
    hardening.confine(hardening.seccomp_filter(False))
helper.serve(conn, helper.stderr_log)
os.write(2, b"served\n")
{
    "exit": lambda: None,
    "execve": lambda: os.execv("/bin/true", ["true"]),
    "openat": lambda: os.open("/etc/hostname", os.O_RDONLY),
    "open": lambda: libc.syscall(ctypes.c_long(2), b"/etc/hostname", ctypes.c_long(0)),
    "ptrace": lambda: libc.ptrace(ctypes.c_long(0), ctypes.c_long(0), None, None),
    "socket": lambda: socket.socket(),
    "setsockopt SO_RCVBUF": lambda: conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),
    "x32 getpid": lambda: libc.syscall(ctypes.c_long(0x40000000 | 39)),
    "mmap read-write": lambda: mmap.mmap(-1, 1 << 20, prot=mmap.PROT_READ | mmap.PROT_WRITE).close(),
    "mmap executable": lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC),
    "i386": i386_call,
    "i386 unfiltered": i386_call,
}[then]()
conn.close()  # an unclosed socket's ResourceWarning formats its repr: getpeername(), not on the list
os.write(2, b"survived\n")
"""


def _filtered_child(tmp_path: Path, pairs: TcpPairs, then: str) -> subprocess.CompletedProcess[str]:
    """Serve two real requests under the helper's filter in a child, then have it do `then`."""
    server = RawServer(tmp_path / f"{then.replace(' ', '-')}.repair")
    child = subprocess.Popen(
        [sys.executable, "-c", FILTERED_CHILD, str(server.path), then],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        server.accept()
        sock = pairs.make(1)[0]
        assert server.request(ON, [sock.fileno()]) == ON.byte
        assert state(sock) == 1
        assert server.request(OFF, [sock.fileno()]) == OFF.byte
        assert state(sock) == 0
        server.close()
        out, err = child.communicate(timeout=20)
    finally:
        server.close()
        if child.poll() is None:
            child.kill()
            child.communicate()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.parametrize(
    "then",
    ["execve", "openat", "open", "ptrace", "socket", "setsockopt SO_RCVBUF", "x32 getpid", "mmap executable"],
)
def test_filter_kills_what_is_not_listed(tmp_path: Path, pairs: TcpPairs, then: str) -> None:
    if then in ("open", "x32 getpid") and os.uname().machine != "x86_64":
        pytest.skip("an x86_64 system call")
    r = _filtered_child(tmp_path, pairs, then)
    assert r.returncode == -signal.SIGSYS, r.stderr
    assert "served" in r.stderr
    assert "survived" not in r.stderr


@pytest.mark.parametrize("then", ["exit", "mmap read-write"])
def test_filter_lets_the_round_trip_and_exit_through(tmp_path: Path, pairs: TcpPairs, then: str) -> None:
    """Requests, exit, and the allocator's read-write mappings pass the filter."""
    r = _filtered_child(tmp_path, pairs, then)
    assert (r.returncode, r.stderr) == (0, "served\nsurvived\n")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="int 0x80 is x86")
def test_filter_kills_a_system_call_of_another_architecture(tmp_path: Path, pairs: TcpPairs) -> None:
    """i386 number 55 is x86_64's getsockopt, which is allowed: only the architecture check stops it."""
    control = _filtered_child(tmp_path, pairs, "i386 unfiltered")
    if control.returncode != 0:
        pytest.skip(f"no i386 system calls on this kernel (control run: {control.returncode})")
    r = _filtered_child(tmp_path, pairs, "i386")
    assert r.returncode == -signal.SIGSYS, r.stderr
    assert "survived" not in r.stderr


# -- the running helper -------------------------------------------------------------


def test_running_helper_holds_net_admin_alone_under_the_filter(tmp_path: Path, pairs: TcpPairs) -> None:
    """Started as root. Waiting in its directory it still has CAP_DAC_OVERRIDE (to reach the socket);
    once connected, CAP_NET_ADMIN alone, no new privileges, the filter on."""
    helper_run = Helper(str(tmp_path))
    try:
        wait_for(
            lambda: confinement(innermost(helper_run.pid))["CapEff"] == NET_ADMIN_AND_DAC_OVERRIDE,
            "helper dropping to connect",
        )
        helper_run.pid = innermost(helper_run.pid)
        assert confinement(helper_run.pid) == {
            "CapInh": "0000000000000000",
            "CapPrm": NET_ADMIN_AND_DAC_OVERRIDE,
            "CapEff": NET_ADMIN_AND_DAC_OVERRIDE,
            "CapBnd": NET_ADMIN_ONLY,
            "CapAmb": "0000000000000000",
            "NoNewPrivs": "1",
            "Seccomp": "0",
        }
        server = RawServer(tmp_path / "vm.repair")
        server.accept()
        sock = pairs.make(1)[0]
        assert server.request(ON, [sock.fileno()]) == ON.byte  # the reply comes from under the filter
        assert confinement(helper_run.pid) == {
            "CapInh": "0000000000000000",
            "CapPrm": NET_ADMIN_ONLY,
            "CapEff": NET_ADMIN_ONLY,
            "CapBnd": NET_ADMIN_ONLY,
            "CapAmb": "0000000000000000",
            "NoNewPrivs": "1",
            "Seccomp": "2",
        }
        server.close()
        assert helper_run.wait() == 0
    finally:
        helper_run.kill()


def test_running_helper_is_not_dumpable(tmp_path: Path, pairs: TcpPairs) -> None:
    """A reader with the helper's uid and capabilities may read a dumpable process's /proc/PID/environ
    (the control, a sleep started the same way), not the helper's."""
    reader = [*SETPRIV_NET_ADMIN_ONLY, "cat"]
    control = subprocess.Popen([*SETPRIV_NET_ADMIN_ONLY, "sleep", "30"])
    try:
        with raw_server_with_helper(tmp_path) as (server, helper_run):
            assert server.request(ON, [pairs.make(1)[0].fileno()]) == ON.byte
            wait_for(lambda: proc_status(control.pid)["CapEff"].strip() == NET_ADMIN_ONLY, "control started")
            readable = subprocess.run([*reader, f"/proc/{control.pid}/environ"], capture_output=True)
            hidden = subprocess.run([*reader, f"/proc/{helper_run.pid}/environ"], capture_output=True, text=True)
    finally:
        control.kill()
        control.wait()
    assert readable.returncode == 0
    assert hidden.returncode != 0
    assert "Permission denied" in hidden.stderr


EXEC_AFTER_DROPPING = r"""
import os
from passt_repair import hardening

hardening.lock_down()
hardening.drop_for_connect()
hardening.confine(None)  # everything but the filter, as with --allow-unconfined
os.execv("/bin/grep", ["grep", "-E", "^(Uid|Cap|NoNewPrivs)", "/proc/self/status"])
"""


def test_uid_0_regains_nothing_on_execve() -> None:
    """Without the filter (which forbids execve), what stops a helper started as root from getting
    capabilities back by executing a program: the locked securebits, the bounding set, no_new_privs."""
    r = subprocess.run([sys.executable, "-c", EXEC_AFTER_DROPPING], capture_output=True, text=True, check=True)
    status = dict(line.split(":\t", 1) for line in r.stdout.splitlines())
    assert status["Uid"].split()[0] == "0"
    assert (status["CapPrm"], status["CapEff"], status["CapAmb"]) == ("0000000000000000",) * 3
    assert (status["CapBnd"], status["NoNewPrivs"]) == (NET_ADMIN_ONLY, "1")


def test_debug_and_signal_under_the_filter(tmp_path: Path, pairs: TcpPairs) -> None:
    """The --debug lines and SIGTERM while waiting for the next message, both after confinement."""
    socks = pairs.make(3)
    with raw_server_with_helper(tmp_path, "--debug") as (server, helper_run):
        assert server.request(ON, [s.fileno() for s in socks]) == ON.byte
        assert confinement(helper_run.pid)["Seccomp"] == "2"
        os.kill(helper_run.pid, signal.SIGTERM)
        assert helper_run.wait() == 0
    assert_clean_stderr(helper_run.stderr)
    assert "ON (1) on 3 sockets in" in helper_run.stderr


INTERNAL_ERROR_CHILD = r"""
import sys
from passt_repair import cli, helper

def broken(*args, **kwargs):
    raise RuntimeError("broken on purpose")

helper.serve = broken
sys.exit(cli.main([sys.argv[1]]))
"""


def test_internal_error_under_the_filter_is_one_line(tmp_path: Path) -> None:
    """An unexpected exception after confinement: printing a traceback would open source files and
    draw SIGSYS; the helper prints one line and exits 1 instead."""
    server = RawServer(tmp_path / "s.repair")
    child = subprocess.Popen(
        [sys.executable, "-c", INTERNAL_ERROR_CHILD, str(server.path)], stderr=subprocess.PIPE, text=True
    )
    try:
        server.accept()
        _, err = child.communicate(timeout=20)
    finally:
        server.close()
        child.kill()
    assert child.returncode == 1
    assert error_lines(err) == ["passt-repair: error: internal error: RuntimeError: broken on purpose"]


# -- refusing to start -----------------------------------------------------------


def test_without_net_admin_exits_before_connecting(tmp_path: Path) -> None:
    server = RawServer(tmp_path / "s.repair")
    try:
        r = subprocess.run(helper_command(str(server.path), prefix=tuple(SETPRIV_NO_CAPS)), capture_output=True)
        stderr = r.stderr.decode()
        assert r.returncode == 1
        assert_clean_stderr(stderr)
        assert len(stderr.splitlines()) == 1
        for hint in (
            "CAP_NET_ADMIN",
            "as root",
            "CAPABILITIES in passt-repair(1)",
            "AmbientCapabilities=CAP_NET_ADMIN",
        ):
            assert hint in stderr
        assert len(stderr) < 200  # one short line; the man page's CAPABILITIES has commands that work as written
        assert no_connection_made(server.listener)
    finally:
        server.close()


def test_unsupported_architecture(tmp_path: Path, pairs: TcpPairs) -> None:
    """setarch makes uname() report i686 to a 64-bit process: refused before connecting, unless
    --allow-unconfined, which runs without the filter but with everything else."""
    server = RawServer(tmp_path / "refused.repair")
    try:
        r = subprocess.run(helper_command(str(server.path), prefix=("setarch", "i686")), capture_output=True)
        assert r.returncode == 1
        assert "no seccomp filter for this architecture (i686, 64-bit)" in r.stderr.decode()
        assert "--allow-unconfined" in r.stderr.decode()
        assert no_connection_made(server.listener)
    finally:
        server.close()
    with raw_server_with_helper(tmp_path, "--allow-unconfined", prefix=("setarch", "i686")) as (server, run):
        assert server.request(ON, [pairs.make(1)[0].fileno()]) == ON.byte
        status = confinement(run.pid)
        assert (status["Seccomp"], status["CapEff"], status["NoNewPrivs"]) == ("0", NET_ADMIN_ONLY, "1")
    assert "going on without one" in run.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--peer-uid"], "needs a UID"),
        (["--peer-uid", "x"], "not a UID"),
        (["--peer-uid", "-1"], "not a UID"),
        (["--peer-uid", "4294967295"], "not a UID"),
    ],
)
def test_peer_uid_usage_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    r = subprocess.run(helper_command(str(tmp_path), *args), capture_output=True, text=True)
    assert (r.returncode, len(r.stderr.splitlines())) == (2, 1)
    assert fragment in r.stderr


# -- who the server is ---------------------------------------------------------------


@contextlib.contextmanager
def server_as(uid: int, path: Path, file_owner: int, fds: list[int]) -> Iterator[tuple[int, int]]:
    """A server process that listens on `path` as `uid`, sends ON for `fds`, and reports the reply.

    Forked from the test process, so it runs as another uid without starting an
    interpreter (which it could not read under /root). It binds as root (the
    directory is root's), gives the file to `file_owner`, then drops to `uid`
    before listen(): SO_PEERCRED reports the credentials the listening socket
    took at listen(), so the helper sees a server of that uid, as it would any.
    Yields the server's pid and the read end of its report: "L" once it listens,
    then "R" and the reply (empty if the helper closed instead).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            os.close(r)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            os.chown(path, file_owner, file_owner)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            listener.listen(1)
            os.write(w, b"L")
            listener.settimeout(15)
            conn, _ = listener.accept()
            conn.settimeout(15)
            try:
                conn.sendmsg([ON.byte], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
                reply = conn.recv(1)
            except (BrokenPipeError, ConnectionResetError):
                reply = b""  # the helper closed first
            os.write(w, b"R" + reply)
        except BaseException as e:
            os.write(w, b"E" + repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        yield pid, r
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)


def _read_report(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize(
    ("option", "file_owner", "accepted", "in_directory"),
    [
        (str(NOBODY), 0, True, False),
        ("0", 0, False, False),
        ("owner", NOBODY, True, False),
        ("owner", 0, False, False),
        ("owner", NOBODY, True, True),
        ("owner", 0, False, True),
    ],
)
def test_peer_uid(
    tmp_path: Path, pairs: TcpPairs, option: str, file_owner: int, accepted: bool, in_directory: bool
) -> None:
    """A server running as uid 65534: `--peer-uid` lets it in only when it names that uid."""
    sock = pairs.make(1)[0]
    path = tmp_path / "s.repair"
    with server_as(NOBODY, path, file_owner, [sock.fileno()]) as (server_pid, report):
        assert _read_report(report, 1) == b"L"
        run = Helper("--peer-uid", option, str(tmp_path if in_directory else path))
        try:
            result = _read_report(report, 2)
            status = run.wait()
        finally:
            run.kill()
    assert_clean_stderr(run.stderr)
    assert f"server pid {server_pid}, uid {NOBODY}, gid {NOBODY}" in run.stderr
    if accepted:
        assert (result, status, state(sock)) == (b"R" + ON.byte, 0, 1)
        assert error_lines(run.stderr) == []
    else:
        assert (result, status, state(sock)) == (b"R", 1, 0)
        if option == "owner":  # passt started as root binds as root, then runs as nobody: the line says what to give
            why = "not the socket file's owner 0 (--peer-uid owner): refusing it"
            why += f"; if it is the server you expect, --peer-uid {NOBODY} accepts it"
        else:
            why = "not 0 (--peer-uid): refusing it"
        assert error_lines(run.stderr) == [f"passt-repair: error: server pid {server_pid} runs as uid {NOBODY}, {why}"]


@pytest.mark.parametrize("when", ["before", "after"])
def test_directory_refuses_a_symlinked_repair_entry(tmp_path: Path, when: str) -> None:
    """A .repair symbolic link to a real server's socket, there at start or made while the helper waits."""
    directory = tmp_path / "d"
    directory.mkdir()
    server = RawServer(tmp_path / "elsewhere.repair")
    link = directory / "vm.repair"
    try:
        if when == "before":
            link.symlink_to(server.path)
        run = Helper(str(directory))
        try:
            if when == "after":
                time.sleep(0.3)
                link.symlink_to(server.path)
            status = run.wait()
        finally:
            run.kill()
        assert status == 1
        assert_clean_stderr(run.stderr)
        assert run.stderr.splitlines() == [f"passt-repair: error: {link} is a symbolic link: refusing it"]
        assert no_connection_made(server.listener)
    finally:
        server.close()
