"""The privileged helper: connect to the server, switch TCP_REPAIR, echo.

passt-repair connects to a server's UNIX socket (or waits in a directory for
one whose name ends in ".repair"), then serves requests until the server
closes the connection: one command byte with 1 to 253 sockets attached
(SCM_RIGHTS); the command is set as TCP_REPAIR on every socket, or on none
of them, and the byte is echoed. Any error ends the program instead of a
reply, so the server sees the connection close.

This module is the whole privileged path. It uses only the standard library.
Exit codes are decided in `cli`: errors raised here are HelperError (exit 1)
or UsageError (exit 2); end of file and connection reset return normally
(exit 0).
"""

from __future__ import annotations

# The C module under `socket`: its Python wrapper costs 3 ms at start-up, and adds nothing the helper needs.
import _socket as socket
import array
import errno
import os
import select
import signal
import stat
import struct
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from .protocol import (
    SCM_MAX_FD,
    SOL_TCP,
    TCP_REPAIR,
    Command,
    ProtocolError,
    decode_command,
    encode_command,
    undo_command,
)

__all__ = ["HelperError", "SwitchError", "UsageError", "connect", "run", "serve", "switch"]

#: sun_path holds 108 bytes, the terminating NUL included.
SUN_PATH_MAX = 107
#: Room for a full message's descriptors; one SCM_RIGHTS message never holds more.
_ANC_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * 4)
#: Directory mode: first retry after ECONNREFUSED (the server bound but has not listened yet),
#: doubling up to the cap; the wait is bounded per step, never a busy loop.
_RETRY_FIRST = 50e-6
_RETRY_MAX = 10e-3


class HelperError(Exception):
    """A failure that ends the helper with exit status 1; the text is the one-line message."""


class UsageError(HelperError):
    """A bad invocation: exit status 2."""


_NAMES = {int(c): f"{c.name} ({int(c)})" for c in Command}


def _oserror(what: str, e: OSError) -> str:
    """'what: ENAME (text)' for an OSError."""
    # ENOTSUP and EOPNOTSUPP share a number on Linux; sockets speak of the second.
    name = "EOPNOTSUPP" if e.errno == errno.EOPNOTSUPP else errno.errorcode.get(e.errno or 0, f"errno {e.errno}")
    return f"{what}: {name} ({os.strerror(e.errno or 0)})"


Log = Callable[[str], None]

TYPE_CHECKING = False  # typing costs the helper ~10 ms at start-up; mypy alone needs it
if TYPE_CHECKING:
    from typing import Literal, TypeAlias

    #: The uid the server must run as: a number, "owner" (the socket file's owner), or None for any.
    PeerUid: TypeAlias = int | Literal["owner"] | None


# ---------------------------------------------------------------------------
# Stopping on SIGTERM and SIGINT


class Stopped(Exception):
    """Raised out of a blocking wait when SIGTERM or SIGINT arrives."""


class _StopSignals:
    """SIGTERM and SIGINT end the helper at once while it waits, after the message while it works.

    A message is switched all or nothing, so a signal that arrives while one
    is being applied only marks the stop; the loop ends after the reply.
    """

    def __init__(self) -> None:
        self.waiting = False
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.waiting:
            raise Stopped


_stop = _StopSignals()


# ---------------------------------------------------------------------------
# Finding and connecting to the server


def connect(path: str, log: Log) -> tuple[socket.socket, int]:
    """Connect to the server's socket at `path`, or wait for one if `path` is a directory.

    #syscalls before the filter: stat lstat socket connect inotify_init1 inotify_add_watch read select getdents64
    Returns the connection and the uid that owns the socket file connected to.
    Raises UsageError for a path too long for sun_path or one that is neither a
    socket nor a directory, HelperError for any other failure (a symbolic link
    in a directory included), Stopped on a signal.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise HelperError(_oserror(f"stat {path}", e)) from None
    if stat.S_ISDIR(st.st_mode):
        return _connect_in_directory(path, log)
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} is not a socket or a directory")
    _check_length(path)
    sock = _unix_socket()
    try:
        _connect_once(sock, path)
    except OSError as e:
        sock.close()
        raise HelperError(_oserror(f"connect {path}", e)) from None
    return sock, st.st_uid


def _check_length(path: str) -> None:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise UsageError(f"socket path too long ({len(os.fsencode(path))} bytes, at most {SUN_PATH_MAX}): {path}")


def _unix_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)


def _connect_once(sock: socket.socket, path: str) -> None:
    """connect(); a signal while it waits raises Stopped. A refused connect() leaves `sock` reusable."""
    try:
        _stop.waiting = True
        sock.connect(path)
    finally:
        _stop.waiting = False


def _connect_in_directory(directory: str, log: Log) -> tuple[socket.socket, int]:
    """Wait for a socket named *.repair in `directory` and connect to it.

    The watch is set up before the directory is read, so a socket created in
    between is seen either way. A socket that exists already is used at once
    (the newest, if several). While the server has bound but not yet called
    listen(), connect() fails with ECONNREFUSED: retry after 50 us, doubling
    up to 10 ms, and wake early if another .repair socket appears. The
    connecting socket is made before the wait, so that little work stands
    between the wake-up and connect().

    Each attempt first looks at the entry itself (lstat): a symbolic link is
    refused, since it could lead the helper, with its privileges, to a socket
    elsewhere. Whoever could swap the entry between that look and connect()
    could as well put a socket of their own there, so only the server may
    write to the directory (docs/SECURITY.md).
    """
    _check_length(os.path.join(directory, "x.repair"))
    watch = _Inotify(directory)
    sock = _unix_socket()
    try:
        found = _newest_repair_socket(directory, os.listdir(directory))
        delay = _RETRY_FIRST
        while True:
            if found is not None:
                path, owner = found
                try:
                    _connect_once(sock, path)
                    return sock, owner
                except (ConnectionRefusedError, FileNotFoundError):
                    pass  # not listening yet, or gone again: keep waiting
                except OSError as e:
                    raise HelperError(_oserror(f"connect {path}", e)) from None
            names = watch.wait(delay if found is not None else None)
            fresh = _newest_repair_socket(directory, names) if names else None
            if fresh is not None:
                found, delay = fresh, _RETRY_FIRST
            elif found is not None:
                found = _newest_repair_socket(directory, [os.path.basename(found[0])])  # look again before retrying
                delay = min(delay * 2, _RETRY_MAX)
    except BaseException:
        sock.close()
        raise
    finally:
        watch.close()


def _newest_repair_socket(directory: str, names: Sequence[str]) -> tuple[str, int] | None:
    """The most recently changed socket among `names` that ends in .repair: its path and owner.

    Raises HelperError for a .repair entry that is a symbolic link.
    """
    best: tuple[int, str, int] | None = None
    for name in names:
        if not name.endswith(".repair"):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise HelperError(f"{path} is a symbolic link: refusing it")
        if stat.S_ISSOCK(st.st_mode) and (best is None or st.st_mtime_ns > best[0]):
            _check_length(path)
            best = (st.st_mtime_ns, path, st.st_uid)
    return (best[1], best[2]) if best else None


class _Inotify:
    """An inotify watch for entries created in (or moved into) one directory."""

    _IN_CLOEXEC = 0o2000000
    _IN_CREATE = 0x100
    _IN_MOVED_TO = 0x80
    _EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; the name follows

    def __init__(self, directory: str) -> None:
        import ctypes  # only directory mode needs it: the standard library has no inotify

        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(self._IN_CLOEXEC)
        if fd < 0:
            raise HelperError(_oserror("inotify_init1", OSError(ctypes.get_errno(), "")))
        self.fd = fd
        if libc.inotify_add_watch(fd, os.fsencode(directory), self._IN_CREATE | self._IN_MOVED_TO) < 0:
            e = OSError(ctypes.get_errno(), "")
            self.close()
            raise HelperError(_oserror(f"inotify_add_watch {directory}", e))

    def wait(self, timeout: float | None) -> list[str]:
        """Names created since the last call; wait up to `timeout` seconds (None: block in read())."""
        _stop.waiting = True
        try:
            if timeout is not None and not select.select([self.fd], [], [], timeout)[0]:
                return []
            data = os.read(self.fd, 64 * 1024)
        finally:
            _stop.waiting = False
        names = []
        offset = 0
        while offset + self._EVENT.size <= len(data):
            _, _, _, length = self._EVENT.unpack_from(data, offset)
            offset += self._EVENT.size
            names.append(os.fsdecode(data[offset : offset + length].rstrip(b"\0")))
            offset += length
        return names

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED). #syscalls before the filter: getsockopt"""
    pid, uid, gid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


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
    """setsockopt(TCP_REPAIR) failed on the socket at `position` of a message.

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
                view.setsockopt(SOL_TCP, TCP_REPAIR, undo_command(state))
        except OSError:
            stuck += 1
    return stuck


# ---------------------------------------------------------------------------
# The request loop

#: A request's byte, as received (unsigned), to the value setsockopt() takes; anything else is refused.
_VALUES = {encode_command(c)[0]: int(c) for c in Command}
_REPLIES = {int(c): encode_command(c) for c in Command}
#: The numbers 0, 1, 2, ...: descriptors are contiguous when they equal a slice of this (one comparison).
_RUN = array.array("i", range(4096 + SCM_MAX_FD))


def _received(ancillary: list[tuple[int, int, bytes]]) -> tuple[array.array[int], bool, int]:
    """The descriptors of the SCM_RIGHTS messages, whether they are n consecutive numbers in
    order, and how many control messages of other kinds came."""
    fds = array.array("i")
    other = 0
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        else:
            other += 1
    contiguous = bool(fds) and fds == _RUN[fds[0] : fds[0] + len(fds)]
    return fds, contiguous, other


def _close(fds: Sequence[int], contiguous: bool) -> None:
    """Close received descriptors: contiguous ones with one close_range(). #syscalls: close_range close"""
    if contiguous:
        os.closerange(fds[0], fds[-1] + 1)
    else:
        for fd in fds:
            os.close(fd)


def serve(conn: socket.socket, log: Log, debug: Log | None = None) -> None:
    """Serve requests on `conn` until the server closes it. #syscalls: recvmsg sendto

    Returns on end of file or connection reset, or after a message once SIGTERM
    or SIGINT has arrived. Raises HelperError on any bad message or failed
    switch, after every received descriptor has been closed and every socket
    of the message has been left as it was.
    """
    table = _SocketTable()
    buf = bytearray(2)  # one byte is a request; a second one means the payload is too long
    buffers = [buf]
    try:
        while not _stop.requested:
            try:
                _stop.waiting = True
                nbytes, ancillary, flags, _ = conn.recvmsg_into(buffers, _ANC_SPACE)
            except ConnectionResetError:
                return
            except OSError as e:
                raise HelperError(_oserror("recvmsg", e)) from None
            finally:
                _stop.waiting = False
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
            try:
                conn.send(_REPLIES[value])
            except (ConnectionResetError, BrokenPipeError):
                return
            except OSError as e:
                raise HelperError(_oserror("send", e)) from None
            if debug:
                debug(f"{_NAMES[value]} on {len(fds)} sockets in {(time.perf_counter() - started) * 1e6:.0f} us")
    finally:
        table.close()


def _refusal(nbytes: int, byte: int, flags: int, count: int, other: int) -> str:
    """Why a message is not a request, in one line (made only when one is refused)."""
    size = "1 byte" if nbytes == 1 else "more than 1 byte" if nbytes else "0 bytes"
    what = f"message of {size} with {count} descriptors"
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
    try:
        decode_command(byte)
    except ProtocolError as e:
        return f"{what}: {e}; nothing changed"
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
    """Switch the message's sockets, or raise HelperError naming the one that failed. #syscalls: newfstatat"""
    try:
        views = table.views(fds, contiguous)
    except OSError as e:  # a descriptor met for the first time is not a socket
        position = next((i for i, fd in enumerate(fds) if not stat.S_ISSOCK(os.fstat(fd).st_mode)), 0)
        raise HelperError(
            _oserror(f"{_what(value, fds)}: descriptor {position + 1}", e) + "; nothing changed"
        ) from None
    try:
        switch(views, value)
    except SwitchError as e:
        outcome = "nothing changed" if not e.stuck else f"{e.stuck} sockets could NOT be put back"
        what = f"{_what(value, fds)}: descriptor {e.position + 1}: setsockopt(TCP_REPAIR)"
        raise HelperError(_oserror(what, e.error) + f"; {outcome}") from None
    except OSError as e:
        what = f"{_what(value, fds)}: descriptor {_first_unreadable(views) + 1}: getsockopt(TCP_REPAIR)"
        raise HelperError(_oserror(what, e) + "; nothing changed") from None


def _what(value: int, fds: Sequence[int]) -> str:
    return f"command {_NAMES[value]} on {len(fds)} descriptors"


def run(
    path: str,
    log: Log,
    debug: Log | None = None,
    *,
    peer_uid: PeerUid = None,
    confine: Callable[[], None] | None = None,
) -> None:
    """Connect to `path` and serve until the server closes the connection or a signal stops us.

    #syscalls before the filter: getpeername
    A server whose uid is not `peer_uid` (with "owner": not the socket file's
    owner) is refused with HelperError. `confine` runs once connected and
    checked, before the first message is read.
    """
    _stop.install()
    try:
        conn, owner = connect(path, log)
    except Stopped:
        return
    try:
        pid, uid, gid = peer_credentials(conn)
        log(f"connected to {conn.getpeername() or path}: server pid {pid}, uid {uid}, gid {gid}")
        expected = owner if isinstance(peer_uid, str) else peer_uid
        if expected is not None and uid != expected:
            whose = f"the socket file's owner {expected}" if isinstance(peer_uid, str) else str(expected)
            raise HelperError(f"server pid {pid} runs as uid {uid}, not {whose} (--peer-uid): refusing it")
        if confine is not None:
            confine()
        serve(conn, log, debug)
    except Stopped:
        return
    finally:
        conn.close()


def stderr_log(message: str) -> None:
    """Write one line to stderr, unbuffered. #syscalls: write"""
    os.write(2, f"passt-repair: {message}\n".encode(errors="replace"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the passt-repair command or python -m passt_repair")
