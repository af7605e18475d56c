# SPDX-License-Identifier: GPL-2.0-or-later
"""The privileged helper: connect to the server, switch TCP_REPAIR, echo.

passt-repair connects to a server's UNIX socket (or waits in a directory for
one whose name ends in ".repair"), then serves requests until the server
closes the connection: one command byte with 1 to 253 sockets attached
(SCM_RIGHTS); the command is set as TCP_REPAIR on every socket, or on none
of them, and the byte is echoed. Any error ends the program instead of a
reply, so the server sees the connection close.

This module is the whole privileged path but for the confinement
(`hardening`, called once connected). It uses only the standard library,
and before connecting only modules written in C, so that it is connected
within a few milliseconds of its start (passt waits 10 ms for a helper):
`os`, `signal`, `struct`, `array` and `enum` would cost about 5 ms together.
`posix` is the module `os` wraps on Linux; `_socket`, `_signal` and `_stat`
are the ones `socket`, `signal` and `stat` wrap.

Exit codes are decided in `cli`: errors raised here are HelperError (exit 1)
or UsageError (exit 2); end of file, connection reset and Stopped (SIGTERM,
SIGINT) end normally (exit 0).
"""

from __future__ import annotations

import _socket as socket
import errno
import posix
import sys
import time
from _stat import S_ISDIR, S_ISLNK, S_ISSOCK

TYPE_CHECKING = False  # typing and collections.abc cost the helper ~3 ms at start-up; mypy alone needs them
if TYPE_CHECKING:
    import signal as _signal  # the same functions, with the types of its stubs
    from collections.abc import Callable, Sequence
    from types import FrameType
    from typing import Literal, TypeAlias

    Log: TypeAlias = Callable[[str], None]
    #: The uid the server must run as: a number, "owner" (the socket file's owner), or None for any.
    PeerUid: TypeAlias = int | Literal["owner"] | None
else:
    import _signal

__all__ = ["HelperError", "Stopped", "SwitchError", "UsageError", "check_start", "connect", "run", "serve", "switch"]

#: The kernel's limit of descriptors in one SCM_RIGHTS message (include/net/scm.h).
SCM_MAX_FD = 253
#: Socket option level and name (include/uapi/linux/tcp.h).
SOL_TCP = 6
TCP_REPAIR = 19
#: The commands by request byte (unsigned), as setsockopt() takes them: TCP_REPAIR_ON, _OFF, _OFF_NO_WP.
#: The same as protocol.Command, which the helper does not import (enum costs 2 ms); a test compares them.
_VALUES = {1: 1, 0: 0, 0xFF: -1}
_NAMES = {1: "ON (1)", 0: "OFF (0)", -1: "OFF_NO_WP (-1)"}
_REPLIES = {1: b"\x01", 0: b"\x00", -1: b"\xff"}

#: sun_path holds 108 bytes, the terminating NUL included.
SUN_PATH_MAX = 107
#: Room for a full message's descriptors; one SCM_RIGHTS message never holds more.
_ANC_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * 4)
#: Directory mode: first retry after ECONNREFUSED (the server bound but has not listened yet),
#: doubling up to the cap; the wait is bounded per step, never a busy loop.
_RETRY_FIRST = 50e-6
_RETRY_MAX = 10e-3
#: Directory mode: a socket that refuses connections this long is said to be waited for (once).
_STALE_AFTER = 1.0
#: The architectures hardening.ARCHES has a filter for (a test checks they agree).
FILTER_ARCHES = ("x86_64", "aarch64")


class HelperError(Exception):
    """A failure that ends the helper with exit status 1; the text is the one-line message."""


class UsageError(HelperError):
    """A bad invocation: exit status 2."""


def _oserror(what: str, e: OSError) -> str:
    """'what: ENAME (text)' for an OSError."""
    # ENOTSUP and EOPNOTSUPP share a number on Linux; sockets speak of the second.
    name = "EOPNOTSUPP" if e.errno == errno.EOPNOTSUPP else errno.errorcode.get(e.errno or 0, f"errno {e.errno}")
    return f"{what}: {name} ({posix.strerror(e.errno or 0)})"


def shown(text: str | bytes) -> str:
    """`text` fit for a log line: as it is if printable ASCII, else quoted with escapes.

    Paths and names come from the command line, the filesystem or the server;
    a control character in one must not move the terminal or start a forged line.
    """
    if isinstance(text, str) and text.isascii() and text.isprintable():
        return text
    return ascii(text)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# ---------------------------------------------------------------------------
# Stopping on SIGTERM and SIGINT, and --timeout


class Stopped(Exception):
    """Raised out of whatever the helper is doing when SIGTERM or SIGINT arrives (exit status 0)."""


class TimedOut(HelperError):
    """Nothing connected within --timeout (SIGALRM)."""


class _StopSignals:
    """SIGTERM and SIGINT end the helper at once, unless it is applying a message: then after it.

    A message is switched all or nothing, so a signal that arrives while one
    is being applied (`busy`) only marks the stop; the reply is then sent only
    if there is room for it at once, and the helper ends. Anywhere else,
    blocked or not, the handler raises Stopped. Only the first signal does: a
    storm of them must not interrupt the way out.
    """

    def __init__(self) -> None:
        self.busy = False
        self.requested = False
        self.timeout = 0.0

    def install(self) -> None:
        _signal.signal(_signal.SIGTERM, self._handle)
        _signal.signal(_signal.SIGINT, self._handle)
        _signal.signal(_signal.SIGALRM, self._expired)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            return
        self.requested = True
        if not self.busy:
            raise Stopped

    def _expired(self, signum: int, frame: FrameType | None) -> None:
        if self.timeout:  # a SIGALRM sent after the connection is ignored
            raise TimedOut(f"nothing to connect to within {self.timeout:g} s (--timeout)")

    def arm(self, seconds: float) -> None:
        """Raise TimedOut in `seconds` (0: never) unless `disarm()` comes first.

        #syscalls before the filter: setitimer
        """
        self.timeout = seconds
        if seconds:
            _signal.setitimer(_signal.ITIMER_REAL, seconds)

    def disarm(self) -> None:
        if self.timeout:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            self.timeout = 0.0


_stop = _StopSignals()


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT raise Stopped (see _StopSignals); call first thing."""
    _stop.install()


# ---------------------------------------------------------------------------
# Before connecting: what the process holds, from /proc/self/status (no ctypes yet)

NO_NET_ADMIN = (
    "CAP_NET_ADMIN is not in the effective capability set: run passt-repair as root, or see"
    " CAPABILITIES in passt-repair(1) (AmbientCapabilities=CAP_NET_ADMIN, or setpriv)"
)
_CAP_NET_ADMIN = 12


def _proc_status() -> dict[str, str]:
    """The fields of /proc/self/status. #syscalls before the filter: openat read close"""
    fd = posix.open("/proc/self/status", posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        chunks = []
        while chunk := posix.read(fd, 65536):
            chunks.append(chunk)
    finally:
        posix.close(fd)
    fields = {}
    for line in b"".join(chunks).decode("ascii", "replace").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def check_start(allow_unconfined: bool) -> bool:
    """Refuse to start, before any connection attempt, what could not be confined.

    Raises HelperError without CAP_NET_ADMIN, or without a seccomp filter for
    this machine unless `allow_unconfined`. Returns whether the filter will be
    installed. Done before connecting so that the server can still fall back.
    """
    try:
        status = _proc_status()
        effective = int(status["CapEff"], 16)
    except (OSError, KeyError, ValueError) as e:
        raise HelperError(f"cannot read the capabilities from /proc/self/status: {e}") from None
    if not effective >> _CAP_NET_ADMIN & 1:
        raise HelperError(NO_NET_ADMIN)
    machine = posix.uname().machine
    if machine in FILTER_ARCHES and sys.maxsize > 2**32 and "Seccomp_filters" in status:
        return True
    if allow_unconfined:
        return False
    if machine in FILTER_ARCHES and sys.maxsize > 2**32:
        what = "this kernel (no seccomp filters)"
    else:
        what = f"this architecture ({shown(machine)}, {64 if sys.maxsize > 2**32 else 32}-bit)"
    raise HelperError(
        f"no seccomp filter for {what}; supported: {', '.join(FILTER_ARCHES)}; --allow-unconfined runs without one"
    )


# ---------------------------------------------------------------------------
# Finding and connecting to the server


def connect(path: str, log: Log, before_waiting: Callable[[], None] | None = None) -> tuple[socket.socket, int]:
    """Connect to the server's socket at `path`, or wait for one if `path` is a directory.

    #syscalls before the filter: newfstatat socket connect inotify_init1 inotify_add_watch read pselect6 getdents64
    Returns the connection and the uid that owns the socket file connected to.
    `before_waiting` runs once if the helper is to wait in the directory.
    Raises UsageError for a path too long for sun_path or one that is neither a
    socket nor a directory, HelperError for any other failure (a symbolic link
    in a directory included), Stopped on a signal, TimedOut past --timeout.
    """
    try:
        st = posix.stat(path)
    except OSError as e:
        raise HelperError(_oserror(f"stat {shown(path)}", e)) from None
    if S_ISDIR(st.st_mode):
        return _connect_in_directory(path, log, before_waiting)
    if not S_ISSOCK(st.st_mode):
        raise UsageError(f"{shown(path)} is not a socket or a directory")
    _check_length(path)
    sock = _unix_socket()
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise HelperError(_oserror(f"connect {shown(path)}", e)) from None
    except BaseException:
        sock.close()
        raise
    return sock, st.st_uid


def _check_length(path: str) -> None:
    size = len(path.encode(sys.getfilesystemencoding(), "surrogateescape"))
    if size > SUN_PATH_MAX:
        raise UsageError(f"socket path too long ({size} bytes, at most {SUN_PATH_MAX}): {shown(path)}")


def _unix_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)


def _join(directory: str, name: str) -> str:
    return directory + name if directory.endswith("/") else f"{directory}/{name}"


def _connect_in_directory(
    directory: str, log: Log, before_waiting: Callable[[], None] | None
) -> tuple[socket.socket, int]:
    """Wait for a socket named *.repair in `directory` and connect to it.

    A socket that exists already is used at once (the newest, if several),
    before any watch is set up. Otherwise `before_waiting` runs (the helper
    gives up what it does not need to wait), the watch is set up and the
    directory read again, so a socket created in between is seen either way.
    While the server has bound but not yet called listen(), connect() fails
    with ECONNREFUSED: retry after 50 us, doubling up to 10 ms, and wake early
    if another .repair socket appears; after a second of refusals, say once
    that the helper waits for it. When the kernel's event queue overflowed,
    the directory is read again. The watched directory deleted, moved or
    unmounted ends the helper (HelperError): the path it was given is not the
    directory it watches any more, and a supervisor starting it again finds
    whatever is there now.

    Each attempt first looks at the entry itself (lstat): a symbolic link is
    refused, since it could lead the helper, with its privileges, to a socket
    elsewhere. Whoever could swap the entry between that look and connect()
    could as well put a socket of their own there, so only the server may
    write to the directory (docs/SECURITY.md).
    """
    _check_length(_join(directory, "x.repair"))
    sock = _unix_socket()
    watch: _Inotify | None = None
    try:
        found = _newest_repair_socket(directory, _listdir(directory))
        delay = _RETRY_FIRST
        refused_since: float | None = None
        said = False
        while True:
            if found is not None:
                path, owner = found
                try:
                    sock.connect(path)
                    return sock, owner
                except (ConnectionRefusedError, FileNotFoundError):
                    now = time.monotonic()
                    if refused_since is None:
                        refused_since = now
                    elif not said and now - refused_since >= _STALE_AFTER:
                        log(f"waiting: {shown(path)} refuses connections (nobody listens on it yet: a stale socket?)")
                        said = True
                except OSError as e:
                    raise HelperError(_oserror(f"connect {shown(path)}", e)) from None
            if watch is None:
                if before_waiting is not None:
                    before_waiting()
                watch = _Inotify(directory)
                names: list[str] | None = _listdir(directory)  # what appeared before the watch was set
            else:
                names = watch.wait(delay if found is not None else None)
                if names is None:  # the kernel's event queue overflowed: events were lost
                    names = _listdir(directory)
            fresh = _newest_repair_socket(directory, names) if names else None
            if fresh is not None:
                if found is None or fresh[0] != found[0]:
                    refused_since, said = None, False
                found, delay = fresh, _RETRY_FIRST
            elif found is not None:
                found = _newest_repair_socket(directory, [found[0].rpartition("/")[2]])  # look again before retrying
                delay = min(delay * 2, _RETRY_MAX)
    except BaseException:
        sock.close()
        raise
    finally:
        if watch is not None:
            watch.close()


def _listdir(directory: str) -> list[str]:
    try:
        return posix.listdir(directory)
    except OSError as e:
        raise HelperError(_oserror(f"read directory {shown(directory)}", e)) from None


def _newest_repair_socket(directory: str, names: Sequence[str]) -> tuple[str, int] | None:
    """The most recently changed socket among `names` that ends in .repair: its path and owner.

    Raises HelperError for a .repair entry that is a symbolic link.
    """
    best: tuple[int, str, int] | None = None
    for name in names:
        if not name.endswith(".repair"):
            continue
        path = _join(directory, name)
        try:
            st = posix.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise HelperError(_oserror(f"lstat {shown(path)}", e)) from None
        if S_ISLNK(st.st_mode):
            raise HelperError(f"{shown(path)} is a symbolic link: refusing it")
        if S_ISSOCK(st.st_mode) and (best is None or st.st_mtime_ns > best[0]):
            _check_length(path)
            best = (st.st_mtime_ns, path, st.st_uid)
    return (best[1], best[2]) if best else None


class _Inotify:
    """An inotify watch for entries created in (or moved into) one directory, and for its end."""

    _IN_CLOEXEC = 0o2000000
    _IN_MOVED_TO = 0x80
    _IN_CREATE = 0x100
    _IN_DELETE_SELF = 0x400
    _IN_MOVE_SELF = 0x800
    _IN_UNMOUNT = 0x2000
    _IN_Q_OVERFLOW = 0x4000
    _IN_IGNORED = 0x8000
    _GONE = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT | _IN_IGNORED
    _HEADER = 16  # struct inotify_event: int wd; uint32 mask, cookie, len; then the name

    def __init__(self, directory: str) -> None:
        import ctypes  # only directory mode needs it, once the directory held no socket: no inotify in the stdlib

        self.directory = directory
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(self._IN_CLOEXEC)
        if fd < 0:
            raise HelperError(_oserror("inotify_init1", OSError(ctypes.get_errno(), "")))
        self.fd = fd
        mask = self._IN_CREATE | self._IN_MOVED_TO | self._IN_DELETE_SELF | self._IN_MOVE_SELF
        path = directory.encode(sys.getfilesystemencoding(), "surrogateescape")
        if libc.inotify_add_watch(fd, path, mask) < 0:
            e = OSError(ctypes.get_errno(), "")
            self.close()
            raise HelperError(_oserror(f"inotify_add_watch {shown(directory)}", e))

    def wait(self, timeout: float | None) -> list[str] | None:
        """Names created since the last call, or None if events were lost (the queue overflowed).

        Waits up to `timeout` seconds (None: blocks in read()). Raises HelperError
        once the watched directory is deleted, moved away or unmounted.
        """
        import select

        if timeout is not None and not select.select([self.fd], [], [], timeout)[0]:
            return []
        data = posix.read(self.fd, 64 * 1024)
        names: list[str] | None = []
        offset = 0
        order = sys.byteorder
        while offset + self._HEADER <= len(data):
            mask = int.from_bytes(data[offset + 4 : offset + 8], order)
            length = int.from_bytes(data[offset + 12 : offset + 16], order)
            offset += self._HEADER
            if mask & self._GONE:
                raise HelperError(
                    f"the directory {shown(self.directory)} was deleted, moved or unmounted while waiting in it"
                )
            if mask & self._IN_Q_OVERFLOW:
                names = None
            elif names is not None:
                names.append(
                    data[offset : offset + length].rstrip(b"\0").decode(sys.getfilesystemencoding(), "surrogateescape")
                )
            offset += length
        return names

    def close(self) -> None:
        if self.fd >= 0:
            posix.close(self.fd)
            self.fd = -1


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED). #syscalls before the filter: getsockopt"""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    order = sys.byteorder
    return (
        int.from_bytes(raw[0:4], order, signed=True),
        int.from_bytes(raw[4:8], order),
        int.from_bytes(raw[8:12], order),
    )


# ---------------------------------------------------------------------------
# Switching a message's sockets


class _SocketTable:
    """Socket objects by descriptor number, made once and reused.

    Python sets a socket option only through a socket object. Received
    descriptors take the lowest free numbers, so every message reuses the same
    few numbers: the table keeps one object per number, made the first time
    that number arrives, and a message costs no object per descriptor. The
    objects are views: they never close their descriptor.
    """

    def __init__(self) -> None:
        self._by_fd: list[socket.socket | None] = []

    def views(self, fds: Sequence[int], contiguous: bool) -> list[socket.socket]:
        """The objects for `fds`. #syscalls: getsockname getsockopt

        Raises OSError (ENOTSOCK) if a descriptor met for the first time is not a socket.
        """
        by_fd = self._by_fd
        if contiguous:
            views = by_fd[fds[0] : fds[0] + len(fds)]
            if len(views) == len(fds) and None not in views:
                return views  # type: ignore[return-value]  # no None: checked just above
        top = max(fds)
        if top >= len(by_fd):
            by_fd.extend([None] * (top + 1 - len(by_fd)))
        return [by_fd[fd] or self._make(fd) for fd in fds]

    def _make(self, fd: int) -> socket.socket:
        view = self._by_fd[fd] = socket.socket(fileno=fd)
        return view

    def close(self) -> None:
        """Forget every object without closing the descriptor it was made for."""
        for view in self._by_fd:
            if view is not None:
                view.detach()
        self._by_fd.clear()


class SwitchError(Exception):
    """setsockopt(TCP_REPAIR) failed on the socket at `position` (0-based) of a message.

    `stuck` counts the sockets that could not be put back (0 unless the kernel
    refuses to undo what it allowed a moment before).
    """

    def __init__(self, position: int, error: OSError, stuck: int) -> None:
        super().__init__(position, error, stuck)
        self.position = position
        self.error = error
        self.stuck = stuck


def switch(views: Sequence[socket.socket], value: int) -> None:
    """Set TCP_REPAIR to `value` on every socket in `views`, or leave all of them as they were.

    #syscalls: getsockopt setsockopt
    The current state of each socket is read first, which also rejects any
    socket that is not TCP (OSError) before anything changes. If a setsockopt()
    fails (a listening socket, a socket of a namespace where the helper lacks
    CAP_NET_ADMIN), every socket is put back to the state it was read in,
    without a window probe, and SwitchError is raised. Nothing cheaper tells
    afterwards which sockets a failed message changed: the kernel accepts a
    state a socket already has and leaves no trace of it.
    """
    prior = [view.getsockopt(SOL_TCP, TCP_REPAIR) for view in views]
    remaining = iter(views)  # after a failure, what is left of it gives the failed position
    try:
        for view in remaining:
            view.setsockopt(SOL_TCP, TCP_REPAIR, value)
    except OSError as e:
        position = len(views) - sum(1 for _ in remaining) - 1
        raise SwitchError(position, e, _restore(views, prior)) from None


def _restore(views: Sequence[socket.socket], prior: Sequence[int]) -> int:
    """Put every socket back to its state in `prior`; return how many would not go back."""
    stuck = 0
    for view, state in zip(views, prior, strict=True):
        try:
            if view.getsockopt(SOL_TCP, TCP_REPAIR) != state:
                view.setsockopt(SOL_TCP, TCP_REPAIR, 1 if state else -1)  # off without a window probe
        except OSError:
            stuck += 1
    return stuck


# ---------------------------------------------------------------------------
# The request loop

#: The descriptors 0, 1, 2, ... as SCM_RIGHTS carries them (native ints): received descriptors are
#: contiguous when their bytes equal a slice of this (one comparison). Made once connected (0.4 ms).
_RUN_LENGTH = 4096 + SCM_MAX_FD
_run = b""


def _received(ancillary: list[tuple[int, int, bytes]]) -> tuple[Sequence[int], bool, int]:
    """The descriptors of the SCM_RIGHTS messages, whether they are n consecutive numbers in
    order, and how many control messages of other kinds came."""
    global _run
    raw = b""
    other = 0
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            raw += data[: len(data) - len(data) % 4]
        else:
            other += 1
    fds = memoryview(raw).cast("i")
    if not _run:
        _run = b"".join(i.to_bytes(4, sys.byteorder) for i in range(_RUN_LENGTH))
    contiguous = bool(fds) and raw == _run[4 * fds[0] : 4 * (fds[0] + len(fds))]
    return fds, contiguous, other


def _close(fds: Sequence[int], contiguous: bool) -> None:
    """Close received descriptors: contiguous ones with one close_range(). #syscalls: close_range close"""
    if contiguous:
        posix.closerange(fds[0], fds[-1] + 1)
    else:
        for fd in fds:
            posix.close(fd)


def serve(conn: socket.socket, log: Log, debug: Log | None = None) -> None:
    """Serve requests on `conn` until the server closes it. #syscalls: recvmsg sendto

    Returns on end of file or connection reset, or after the message being
    applied when SIGTERM or SIGINT arrived (its reply sent if there is room
    for it at once); raises Stopped when one arrives at any other time, a
    wait for room to send a reply included.
    Raises HelperError on any bad message or failed switch, after every
    received descriptor has been closed and every socket of the message has
    been left as it was.
    """
    table = _SocketTable()
    buf = bytearray(2)  # one byte is a request; a second one means the payload is too long
    buffers = [buf]
    try:
        while True:
            try:
                nbytes, ancillary, flags, _ = conn.recvmsg_into(buffers, _ANC_SPACE)
            except ConnectionResetError:
                return
            except OSError as e:
                raise HelperError(_oserror("recvmsg", e)) from None
            _stop.busy = True
            try:
                fds, contiguous, other = _received(ancillary)
                try:
                    if nbytes == 0 and not fds:
                        return
                    started = time.perf_counter() if debug else 0.0
                    value = _VALUES.get(buf[0]) if nbytes == 1 and fds and not (flags or other) else None
                    if value is None:
                        raise HelperError(_refusal(nbytes, buf[0], flags, len(fds), other))
                    _apply(table, fds, contiguous, value)
                finally:
                    _close(fds, contiguous)
                if debug:
                    elapsed = (time.perf_counter() - started) * 1e6
                    debug(f"{_NAMES[value]} on {_count(len(fds), 'socket')} in {elapsed:.0f} us")
                if not _reply(conn, _REPLIES[value]):
                    return
            finally:
                _stop.busy = False
            if _stop.requested:
                return
    finally:
        table.close()


def _reply(conn: socket.socket, reply: bytes) -> bool:
    """Send the reply while `_stop.busy`; False if the server has gone, or a signal came before there was room.

    A server that does not read its replies fills the socket buffer: then the
    helper waits for room with `busy` cleared, so that a signal ends the wait.
    """
    try:
        try:
            conn.send(reply, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if _stop.requested:
                return False
            _stop.busy = False
            conn.send(reply)
    except (ConnectionResetError, BrokenPipeError):
        return False
    except OSError as e:
        raise HelperError(_oserror("send", e)) from None
    return True


def _refusal(nbytes: int, byte: int, flags: int, count: int, other: int) -> str:
    """Why a message is not a request, in one line (made only when one is refused)."""
    size = "1 byte" if nbytes == 1 else "more than 1 byte" if nbytes else "0 bytes"
    what = f"message of {size} with {_count(count, 'descriptor')}"
    if flags & socket.MSG_CTRUNC:
        return f"{what}: control message truncated (descriptor limit reached?); nothing changed"
    if nbytes != 1:
        return f"{what}: a request is exactly one byte; nothing changed"
    if other:
        return f"{what}: unexpected control message other than SCM_RIGHTS; nothing changed"
    if not count:
        return f"{what}: a request carries 1 to {SCM_MAX_FD} descriptors; nothing changed"
    if flags:
        return f"{what}: unexpected message flags {flags:#x}; nothing changed"
    if byte not in _VALUES:
        signed = byte - 256 if byte > 127 else byte
        return f"{what}: unsupported command byte {signed} (expected 1, 0 or -1); nothing changed"
    return f"{what}: not a request; nothing changed"


def _first_unreadable(views: Sequence[socket.socket]) -> int:
    """The position of the first socket whose TCP_REPAIR state cannot be read (for the message)."""
    for i, view in enumerate(views):
        try:
            view.getsockopt(SOL_TCP, TCP_REPAIR)
        except OSError:
            return i
    return 0


def _apply(table: _SocketTable, fds: Sequence[int], contiguous: bool, value: int) -> None:
    """Switch the message's sockets, or raise HelperError naming the one that failed. #syscalls: newfstatat

    Positions in messages count from 1: "descriptor 2 of 3" is the second one the message carried.
    """
    try:
        views = table.views(fds, contiguous)
    except OSError as e:  # a descriptor met for the first time is not a socket
        position = next((i for i, fd in enumerate(fds) if not S_ISSOCK(posix.fstat(fd).st_mode)), 0)
        raise HelperError(_oserror(f"{_what(value, fds, position)}", e) + "; nothing changed") from None
    try:
        switch(views, value)
    except SwitchError as e:
        outcome = "nothing changed" if not e.stuck else f"{_count(e.stuck, 'socket')} could NOT be put back"
        what = f"{_what(value, fds, e.position)}: setsockopt(TCP_REPAIR)"
        raise HelperError(_oserror(what, e.error) + f"; {outcome}") from None
    except OSError as e:
        what = f"{_what(value, fds, _first_unreadable(views))}: getsockopt(TCP_REPAIR)"
        raise HelperError(_oserror(what, e) + "; nothing changed") from None


def _what(value: int, fds: Sequence[int], position: int) -> str:
    return f"command {_NAMES[value]} on {_count(len(fds), 'descriptor')}: descriptor {position + 1} of {len(fds)}"


def run(
    path: str,
    log: Log,
    debug: Log | None = None,
    *,
    peer_uid: PeerUid = None,
    confine: Callable[[], None] | None = None,
    before_waiting: Callable[[], None] | None = None,
    timeout: float = 0.0,
) -> None:
    """Connect to `path` and serve until the server closes the connection or a signal stops us.

    #syscalls before the filter: getpeername
    `confine` runs once connected, before anything is read from the server
    and before any line naming it is logged; `before_waiting` runs if the
    helper is to wait in a directory (see connect). A server whose uid is not
    `peer_uid` (with "owner": not the socket file's owner) is refused with
    HelperError. With `timeout` (seconds), TimedOut is raised if nothing
    connected in time. Stopped (a signal) propagates.
    """
    _stop.arm(timeout)
    try:
        conn, owner = connect(path, log, before_waiting)
    finally:
        _stop.disarm()
    try:
        pid, uid, gid = peer_credentials(conn)
        name = conn.getpeername() or path
        if confine is not None:
            confine()
        log(f"connected to {shown(name)}: server pid {pid}, uid {uid}, gid {gid}")
        expected = owner if isinstance(peer_uid, str) else peer_uid
        if expected is not None and uid != expected:
            if isinstance(peer_uid, str):  # passt started as root binds its socket as root, then runs as nobody
                raise HelperError(
                    f"server pid {pid} runs as uid {uid}, not the socket file's owner {expected} (--peer-uid owner):"
                    f" refusing it; if it is the server you expect, --peer-uid {uid} accepts it"
                )
            raise HelperError(f"server pid {pid} runs as uid {uid}, not {expected} (--peer-uid): refusing it")
        serve(conn, log, debug)
    finally:
        conn.close()


def stderr_log(message: str) -> None:
    """Write one line to stderr, unbuffered; a failed write is ignored: logging never stops service.

    #syscalls: write
    """
    try:  # noqa: SIM105  # contextlib.suppress: an import of 2 ms at start-up
        posix.write(2, f"passt-repair: {message}\n".encode(errors="replace"))
    except OSError:
        pass
