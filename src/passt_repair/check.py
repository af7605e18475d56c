# SPDX-License-Identifier: GPL-2.0-or-later
"""passt-repair-check: the protocol's guarantees, checked against any repair helper.

Runs a helper binary (this project's, upstream's C one, a packager's build)
against a raw server that sends exactly what each check needs, on real
loopback TCP sockets, and reads every outcome back from the kernel:
TCP_REPAIR with getsockopt(), the helper's descriptors in /proc/PID/fd, its
CPU time in /proc/PID/stat. Each guarantee runs against a fresh helper
process, so one that fails cannot spoil the next. One line per guarantee:

    holds  NAME: what was checked
    FAILS  NAME: what happened instead

Needs root: it puts its own test sockets into known repair states first
(setsockopt(TCP_REPAIR) needs CAP_NET_ADMIN) and reads a non-dumpable
helper's /proc entries.

Exit status: 0 when every guarantee holds, 1 when at least one fails, 2 when
the checks cannot run (usage error, no such helper, not root).
"""

from __future__ import annotations

import array
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .protocol import SCM_MAX_FD, SOL_TCP, TCP_REPAIR, Command

__all__ = ["GUARANTEES", "Guarantee", "main"]

PROG = "passt-repair-check"
USAGE = f"usage: {PROG} [--helper PATH] [--only NAME[,NAME...]] [--directory DIR] [-- HELPER-ARGS...]"
EXIT_ALL_HOLD, EXIT_SOME_FAIL, EXIT_CANNOT_RUN = 0, 1, 2

#: How long a helper gets to connect, to answer, and to exit. Generous: a loaded machine is slow,
#: and a helper that keeps a guarantee never makes the check wait this long.
_WAIT = 5.0
#: The descriptor limit the truncation check starts the helper with: room for an interpreter's
#: start-up, far less than the 253 descriptors of the message it then receives.
_TRUNCATING_NOFILE = 64
#: sun_path holds 108 bytes, the terminating NUL included.
_SUN_PATH_MAX = 107
#: CPU time a helper may use while waiting one second for a late listen(); a spinning one uses ~1 s.
_WAITING_CPU_LIMIT = 0.1


class CheckFailed(Exception):
    """A guarantee does not hold; the message says what happened instead."""


class CannotRun(Exception):
    """The checks cannot run at all here; the message is the one line the user sees."""


# ---------------------------------------------------------------------------
# The rig: test sockets, a raw server, the helper as a subprocess


def _repair(fd: int) -> int:
    view = socket.socket(fileno=fd)
    try:
        return view.getsockopt(SOL_TCP, TCP_REPAIR)
    finally:
        view.detach()


class Sockets:
    """Connected loopback TCP pairs, made once; `clients` are what the helper switches."""

    def __init__(self, n: int) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(n)
        self.clients: list[socket.socket] = []
        self.peers: list[socket.socket] = []
        for _ in range(n):
            self.clients.append(socket.create_connection(self.listener.getsockname()))
            self.peers.append(self.listener.accept()[0])

    def fds(self, n: int) -> list[int]:
        return [s.fileno() for s in self.clients[:n]]

    def set(self, fds: Sequence[int], states: Sequence[int]) -> None:
        """Put sockets into given repair states directly (this process is root)."""
        for fd, on in zip(fds, states, strict=True):
            view = socket.socket(fileno=fd)
            try:
                view.setsockopt(SOL_TCP, TCP_REPAIR, int(Command.ON if on else Command.OFF_NO_WP))
            finally:
                view.detach()

    @staticmethod
    def states(fds: Sequence[int]) -> list[int]:
        return [_repair(fd) for fd in fds]

    def close(self) -> None:
        for s in self.clients:
            with contextlib.suppress(OSError):
                s.setsockopt(SOL_TCP, TCP_REPAIR, int(Command.OFF_NO_WP))
            s.close()
        for s in [*self.peers, self.listener]:
            s.close()


class Helper:
    """The helper under test, started in a session of its own (so a wrapper and its children go together)."""

    def __init__(self, command: Sequence[str], path: Path, log: Path, nofile: int | None = None) -> None:
        def limit() -> None:
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [*command, str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                preexec_fn=limit if nofile is not None else None,
            )

    def last_words(self) -> str:
        """The helper's last line on stderr, for a failure message ('' if it said nothing)."""
        lines = self.log.read_bytes().decode(errors="replace").strip().splitlines()
        return lines[-1].strip() if lines else ""

    def exit_status(self, timeout: float = _WAIT) -> int | None:
        """Its exit status, waiting up to `timeout` seconds; None if it is still running then."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def processes(self) -> list[int]:
        """The helper's process and all its descendants (a wrapper may not exec the real helper)."""
        parents: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    parents.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(parents.get(pid, []))
        return found

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.processes():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def watching(self) -> bool:
        """Whether any of its processes holds an inotify watch (what a helper in directory mode waits on)."""
        for pid in self.processes():
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                    with contextlib.suppress(OSError):
                        if "inotify wd:" in Path(f"/proc/{pid}/fdinfo/{fd}").read_text():
                            return True
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class Connection:
    """The server's end of one helper's connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(_WAIT)
        self.pid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]

    def send(self, payload: bytes, fds: Sequence[int]) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([payload], ancillary)

    def reply(self) -> bytes:
        """What the helper answered: b'' if it closed the connection instead; raises CheckFailed on silence."""
        try:
            return self.sock.recv(16)
        except ConnectionResetError:
            return b""
        except TimeoutError:
            raise CheckFailed(f"no reply and no close within {_WAIT:g} s") from None

    def request(self, command: Command, fds: Sequence[int]) -> None:
        """A valid request that must be applied and echoed."""
        self.send(command.byte, fds)
        got = self.reply()
        if got != command.byte:
            said = "closed the connection" if not got else f"replied {got!r}"
            raise CheckFailed(f"{command.name} on {_count(len(fds), 'socket')}: the helper {said}")

    def descriptors(self) -> set[int]:
        try:
            return {int(n) for n in os.listdir(f"/proc/{self.pid}/fd")}
        except OSError as e:
            raise CheckFailed(f"cannot read /proc/{self.pid}/fd: {e.strerror}") from None


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


class Rig:
    """What every check works with: the helper's command, the test sockets, a scratch directory."""

    def __init__(self, command: Sequence[str], sockets: Sockets, scratch: Path) -> None:
        self.command = list(command)
        self.sockets = sockets
        self.scratch = scratch
        self._runs = 0

    @contextlib.contextmanager
    def session(self, nofile: int | None = None) -> Iterator[tuple[Connection, Helper]]:
        """A raw server on a fresh socket path, a fresh helper connected to it."""
        directory = self.fresh_directory()
        with _listening(directory / "check.repair") as listener:
            helper = Helper(self.command, directory / "check.repair", directory / "stderr", nofile)
            try:
                conn = _accept(listener, helper)
                try:
                    yield Connection(conn), helper
                finally:
                    conn.close()
            finally:
                helper.stop()

    @contextlib.contextmanager
    def helper_in_directory(self) -> Iterator[tuple[Path, Helper]]:
        """A fresh helper started on an empty directory (directory mode)."""
        directory = self.fresh_directory()
        watched = directory / "watched"
        watched.mkdir()
        helper = Helper(self.command, watched, directory / "stderr")
        try:
            yield watched, helper
        finally:
            helper.stop()

    def fresh_directory(self) -> Path:
        self._runs += 1
        directory = self.scratch / str(self._runs)
        directory.mkdir()
        return directory


@contextlib.contextmanager
def _listening(path: Path, listen: bool = True) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        if listen:
            sock.listen(1)
        yield sock
    finally:
        sock.close()


def _accept(listener: socket.socket, helper: Helper, within: float = _WAIT) -> socket.socket:
    """The helper's connection; raises CheckFailed if it exits or does not connect in time."""
    deadline = time.monotonic() + within
    while True:
        listener.settimeout(0.05)
        try:
            return listener.accept()[0]
        except TimeoutError:
            pass
        status = helper.proc.poll()
        if status is not None:
            said = helper.last_words()
            raise CheckFailed(
                f"the helper exited with status {status} without connecting" + (f": {said}" if said else "")
            )
        if time.monotonic() > deadline:
            raise CheckFailed(f"the helper did not connect within {within:g} s")


def _refused(conn: Connection, helper: Helper, fds: Sequence[int], before: Sequence[int], what: str) -> str:
    """After a request the helper must refuse: no reply, exit status 1, every socket as it was."""
    got = conn.reply()
    if got:
        raise CheckFailed(f"{what}: the helper replied {got!r} instead of closing the connection")
    status = helper.exit_status()
    changed = sum(a != b for a, b in zip(Sockets.states(fds), before, strict=True))
    if changed:
        raise CheckFailed(f"{what}: refused, but {_count(changed, 'socket')} of {len(fds)} left switched")
    if status != 1:
        raise CheckFailed(f"{what}: refused and nothing changed, but exit status {status} instead of 1")
    return f"{what}: refused, nothing changed, exit status 1"


def _mixed(n: int) -> list[int]:
    return [int(i % 3 == 0) for i in range(n)]


# ---------------------------------------------------------------------------
# The guarantees


@dataclass(frozen=True)
class Guarantee:
    name: str
    check: Callable[[Rig], str]


def _command_applied(command: Command) -> Callable[[Rig], str]:
    def check(rig: Rig) -> str:
        fds = rig.sockets.fds(SCM_MAX_FD)
        rig.sockets.set(fds, [command != Command.ON] * len(fds))
        with rig.session() as (conn, _):
            conn.request(command, fds)
            wrong = sum(s != int(command == Command.ON) for s in rig.sockets.states(fds))
            if wrong:
                raise CheckFailed(f"{command.name} echoed, but {wrong} of {len(fds)} sockets not switched")
        return f"{command.name} ({int(command)}) on {len(fds)} sockets: every one switched, the byte echoed"

    return check


def check_full_after_smaller(rig: Rig) -> str:
    """Upstream's helper sets its control buffer once, the kernel shrinks it to each message's size."""
    sizes = [1, SCM_MAX_FD, 2, SCM_MAX_FD]
    with rig.session() as (conn, _):
        for i, n in enumerate(sizes):
            fds = rig.sockets.fds(n)
            command = Command.ON if i % 2 == 0 else Command.OFF_NO_WP
            rig.sockets.set(fds, [command != Command.ON] * n)
            conn.request(command, fds)
            wrong = sum(s != int(command == Command.ON) for s in rig.sockets.states(fds))
            if wrong:
                raise CheckFailed(f"message {i + 1} ({n} sockets) echoed, but {wrong} of them not switched")
    return f"messages of {', '.join(map(str, sizes))} sockets in turn: every socket of each switched"


def check_truncated(rig: Rig) -> str:
    fds = rig.sockets.fds(SCM_MAX_FD)
    before = _mixed(len(fds))
    rig.sockets.set(fds, before)
    with rig.session(nofile=_TRUNCATING_NOFILE) as (conn, helper):
        conn.send(Command.ON.byte, fds)
        return _refused(
            conn, helper, fds, before, f"{len(fds)} descriptors to a helper limited to {_TRUNCATING_NOFILE}"
        )


def check_all_or_nothing(rig: Rig) -> str:
    """A listening socket passes a read of TCP_REPAIR and fails only when set: the ones before it must be put back."""
    fds = rig.sockets.fds(SCM_MAX_FD)
    before = _mixed(len(fds))
    rig.sockets.set(fds, before)
    position = 100
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        sent = [*fds[:position], listening.fileno(), *fds[position + 1 :]]
        with rig.session() as (conn, helper):
            conn.send(Command.ON.byte, sent)
            what = f"ON with a listening socket at position {position + 1} of {len(sent)}"
            return _refused(
                conn, helper, fds[:position] + fds[position + 1 :], before[:position] + before[position + 1 :], what
            )


def check_unknown_command(rig: Rig) -> str:
    fds = rig.sockets.fds(3)
    results = []
    for byte in (b"\x02", b"\x80"):
        rig.sockets.set(fds, [0, 1, 0])
        with rig.session() as (conn, helper):
            conn.send(byte, fds)
            results.append(
                _refused(conn, helper, fds, [0, 1, 0], f"byte {int.from_bytes(byte, 'little', signed=True)}")
            )
    return "; ".join(results)


def check_one_byte(rig: Rig) -> str:
    """A request is exactly one byte: a helper that reads one byte at a time would answer the first."""
    fds = rig.sockets.fds(3)
    rig.sockets.set(fds, [0, 1, 0])
    with rig.session() as (conn, helper):
        conn.send(Command.ON.byte * 2, fds)
        return _refused(conn, helper, fds, [0, 1, 0], "a request of 2 bytes")


def check_no_descriptors(rig: Rig) -> str:
    with rig.session() as (conn, helper):
        conn.send(Command.ON.byte, [])
        return _refused(conn, helper, [], [], "a request without descriptors")


def check_end_of_file(rig: Rig) -> str:
    fds = rig.sockets.fds(1)
    with rig.session() as (conn, helper):
        conn.request(Command.ON, fds)
        conn.request(Command.OFF_NO_WP, fds)
        conn.sock.close()
        status = helper.exit_status()
    if status != 0:
        said = helper.last_words()
        raise CheckFailed(f"server closed after two requests: exit status {status}" + (f" ({said})" if said else ""))
    return "server closed after two requests: exit status 0"


def check_descriptors_closed(rig: Rig) -> str:
    with rig.session() as (conn, _):
        idle = conn.descriptors()
        for n in (SCM_MAX_FD, 1, SCM_MAX_FD):
            conn.request(Command.ON, rig.sockets.fds(n))
            kept = conn.descriptors() - idle
            if kept:
                raise CheckFailed(
                    f"after a message of {n} sockets the helper still holds {_count(len(kept), 'descriptor')}"
                )
        rig.sockets.set(rig.sockets.fds(SCM_MAX_FD), [0] * SCM_MAX_FD)
    return f"after messages of {SCM_MAX_FD}, 1, {SCM_MAX_FD} sockets: no received descriptor left open"


def _wait_watching(helper: Helper) -> None:
    """Until the helper watches its directory (or 1 s: one that polls instead is not held to inotify)."""
    deadline = time.monotonic() + 1
    while not helper.watching() and helper.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def check_directory_created_later(rig: Rig) -> str:
    fds = rig.sockets.fds(1)
    with rig.helper_in_directory() as (directory, helper):
        _wait_watching(helper)
        (directory / "other.sock").write_bytes(b"")
        with _listening(directory / "vm.socket.repair") as listener:
            conn = Connection(_accept(listener, helper))
            with contextlib.closing(conn.sock):
                conn.request(Command.ON, fds)
                conn.request(Command.OFF_NO_WP, fds)
    return "a .repair socket created after the helper started: connected to it, requests served"


def check_directory_existing(rig: Rig) -> str:
    fds = rig.sockets.fds(1)
    directory = rig.fresh_directory()
    with _listening(directory / "vm.socket.repair") as listener:
        helper = Helper(rig.command, directory, rig.scratch / f"{directory.name}.stderr")
        try:
            try:
                conn = Connection(_accept(listener, helper, within=3))
            except CheckFailed as e:
                raise CheckFailed(f"a .repair socket there before the helper started: {e}") from None
            with contextlib.closing(conn.sock):
                conn.request(Command.ON, fds)
                conn.request(Command.OFF_NO_WP, fds)
        finally:
            helper.stop()
    return "a .repair socket there before the helper started: connected to it at once"


def check_directory_late_listen(rig: Rig) -> str:
    with rig.helper_in_directory() as (directory, helper):
        _wait_watching(helper)
        with _listening(directory / "vm.socket.repair", listen=False) as listener:
            time.sleep(0.2)  # it sees the socket and is refused (bound, not listening)
            before = helper.cpu_seconds()
            time.sleep(1.0)
            used = helper.cpu_seconds() - before
            listener.listen(1)
            Connection(_accept(listener, helper)).sock.close()
    if used > _WAITING_CPU_LIMIT:
        raise CheckFailed(f"bound a second before listen(): the helper used {used:.2f} s of CPU waiting")
    return f"bound a second before listen(): connected after it, {used:.2f} s of CPU while waiting"


GUARANTEES = (
    Guarantee("command-on", _command_applied(Command.ON)),
    Guarantee("command-off", _command_applied(Command.OFF)),
    Guarantee("command-off-no-wp", _command_applied(Command.OFF_NO_WP)),
    Guarantee("full-after-smaller", check_full_after_smaller),
    Guarantee("truncated-refused", check_truncated),
    Guarantee("all-or-nothing", check_all_or_nothing),
    Guarantee("unknown-command-refused", check_unknown_command),
    Guarantee("one-byte-requests", check_one_byte),
    Guarantee("descriptors-required", check_no_descriptors),
    Guarantee("end-of-file-exits-0", check_end_of_file),
    Guarantee("descriptors-closed", check_descriptors_closed),
    Guarantee("directory-created-later", check_directory_created_later),
    Guarantee("directory-existing", check_directory_existing),
    Guarantee("directory-late-listen", check_directory_late_listen),
)


# ---------------------------------------------------------------------------
# The command


def _has_net_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 12 & 1)  # CAP_NET_ADMIN
    return False


def _default_helper() -> str | None:
    beside = Path(sys.executable).with_name("passt-repair")
    return str(beside) if beside.exists() else shutil.which("passt-repair")


@dataclass(frozen=True)
class Options:
    #: The helper's command line, without the socket path.
    command: list[str]
    guarantees: tuple[Guarantee, ...]
    #: Where the scratch directory with the repair sockets is made (None: the system's temporary directory).
    directory: str | None = None
    help: bool = False


def _parse(argv: Sequence[str]) -> Options:
    """Parse the command line; raises CannotRun."""
    args = list(argv)
    extra: list[str] = []
    if "--" in args:
        extra = args[args.index("--") + 1 :]
        args = args[: args.index("--")]
    if "--help" in args or "-h" in args:
        return Options([], (), help=True)
    helper: str | None = None
    directory: str | None = None
    chosen: tuple[Guarantee, ...] = GUARANTEES
    while args:
        arg = args.pop(0)
        if arg in ("--helper", "--only", "--directory") and not args:
            raise CannotRun(f"{arg} needs a value ({USAGE})")
        if arg == "--helper":
            helper = args.pop(0)
        elif arg == "--directory":
            directory = args.pop(0)
            if not os.path.isdir(directory):
                raise CannotRun(f"--directory {directory}: not a directory")
        elif arg == "--only":
            names = args.pop(0).split(",")
            unknown = set(names) - {g.name for g in GUARANTEES}
            if unknown:
                raise CannotRun(f"--only: no guarantee named {', '.join(sorted(unknown))} (see --help)")
            chosen = tuple(g for g in GUARANTEES if g.name in names)
        else:
            raise CannotRun(f"unexpected argument {arg} ({USAGE})")
    if helper is None:
        helper = _default_helper()
        if helper is None:
            raise CannotRun("no passt-repair beside this interpreter or on PATH: name one with --helper PATH")
    found = shutil.which(helper) if "/" not in helper else helper
    if found is None or not os.access(found, os.X_OK) or os.path.isdir(found):
        raise CannotRun(f"--helper {helper}: not an executable file")
    return Options([os.path.abspath(found), *extra], chosen, directory)


HELP = f"""{USAGE}

Check a passt-repair helper against the protocol's guarantees, on real
loopback TCP sockets: one line per guarantee, "holds" or "FAILS" and why.
HELPER-ARGS go to the helper before the socket path it is given.

options:
  --helper PATH  the helper to check (default: the passt-repair installed
                 beside this interpreter, else the one on PATH)
  --only NAMES   check only these guarantees (comma-separated)
  --directory DIR
                 make the servers' sockets under DIR (default: the system's
                 temporary directory); under an AppArmor or SELinux policy,
                 a directory the helper is allowed to reach

guarantees: {", ".join(g.name for g in GUARANTEES)}

Needs root. Exit status: 0 if every guarantee holds, 1 if any fails, 2 if
the checks cannot run."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run every check against the helper; return the exit status."""
    try:
        options = _parse(sys.argv[1:] if argv is None else argv)
        if options.help:
            print(HELP)
            return EXIT_ALL_HOLD
        if os.geteuid() != 0 or not _has_net_admin():
            raise CannotRun(
                "needs root: it sets TCP_REPAIR on its own test sockets and reads the helper's /proc entries"
            )
    except CannotRun as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    with tempfile.TemporaryDirectory(prefix="prc.", dir=options.directory) as scratch:
        longest = f"{scratch}/{len(options.guarantees) + 10}/watched/vm.socket.repair"
        if len(os.fsencode(longest)) > _SUN_PATH_MAX:
            print(f"{PROG}: error: {scratch}: too deep for the sockets' paths ({_SUN_PATH_MAX} bytes)", file=sys.stderr)
            return EXIT_CANNOT_RUN
        return _run(options, Path(scratch))


def _test_sockets() -> Sockets:
    """253 connected loopback pairs, the descriptor limit raised to make room if it can be."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * SCM_MAX_FD
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard)
        )
    try:
        return Sockets(SCM_MAX_FD)
    except OSError as e:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        raise CannotRun(
            f"cannot make {SCM_MAX_FD} loopback TCP connections (open files limit {limit}): {e.strerror}"
        ) from None


def _run(options: Options, scratch: Path) -> int:
    """Each guarantee in turn, one line each; the exit status."""
    try:
        sockets = _test_sockets()
    except CannotRun as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    print(f"{PROG}: checking {' '.join(options.command)}", flush=True)
    failed = 0
    try:
        rig = Rig(options.command, sockets, scratch)
        for guarantee in options.guarantees:
            try:
                line = f"holds  {guarantee.name}: {guarantee.check(rig)}"
            except CheckFailed as e:
                failed += 1
                line = f"FAILS  {guarantee.name}: {e}"
            except OSError as e:
                failed += 1
                line = f"FAILS  {guarantee.name}: {e.strerror or e}"
            print(line, flush=True)
    finally:
        sockets.close()
    print(f"{len(options.guarantees) - failed} of {len(options.guarantees)} guarantees hold", flush=True)
    return EXIT_ALL_HOLD if not failed else EXIT_SOME_FAIL


if __name__ == "__main__":
    sys.exit(main())
