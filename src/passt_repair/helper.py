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

import array
import errno
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from .protocol import SCM_MAX_FD, SOL_TCP, TCP_REPAIR, ProtocolError, decode_command, undo_command

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


_NAMES = {1: "ON (1)", 0: "OFF (0)", -1: "OFF_NO_WP (-1)"}


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
    try:
        return _connect_once(path, in_directory=False)
    except OSError as e:
        raise HelperError(_oserror(f"connect {path}", e)) from None


def _check_length(path: str) -> None:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise UsageError(f"socket path too long ({len(os.fsencode(path))} bytes, at most {SUN_PATH_MAX}): {path}")


def _connect_once(path: str, in_directory: bool) -> tuple[socket.socket, int]:
    """Connect to the socket file at `path`; return the connection and the file's owner.

    In a directory the name must not be a symbolic link. The file is looked at
    just before connect(): whoever could swap it in between could as well put
    a socket of their own there, so only the server may write to the directory.
    """
    st = os.lstat(path) if in_directory else os.stat(path)
    if stat.S_ISLNK(st.st_mode):
        raise HelperError(f"{path} is a symbolic link: refusing it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        _stop.waiting = True
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    finally:
        _stop.waiting = False
    return sock, st.st_uid


def _connect_in_directory(directory: str, log: Log) -> tuple[socket.socket, int]:
    """Wait for a socket named *.repair in `directory` and connect to it.

    The watch is set up before the directory is read, so a socket created in
    between is seen either way. A socket that exists already is used at once
    (the newest, if several). While the server has bound but not yet called
    listen(), connect() fails with ECONNREFUSED: retry after 50 us, doubling
    up to 10 ms, and wake early if another .repair socket appears.
    """
    _check_length(os.path.join(directory, "x.repair"))
    watch = _Inotify(directory)
    try:
        candidate = _newest_repair_socket(directory, os.listdir(directory))
        delay = _RETRY_FIRST
        while True:
            if candidate is not None:
                _check_length(candidate)
                try:
                    return _connect_once(candidate, in_directory=True)
                except (ConnectionRefusedError, FileNotFoundError):
                    pass  # not listening yet, or gone again: keep waiting
                except OSError as e:
                    raise HelperError(_oserror(f"connect {candidate}", e)) from None
            names = watch.wait(delay if candidate is not None else None)
            if names:
                found = _newest_repair_socket(directory, names)
                if found is not None:
                    candidate, delay = found, _RETRY_FIRST
                    continue
            delay = min(delay * 2, _RETRY_MAX)
    finally:
        watch.close()


def _newest_repair_socket(directory: str, names: Sequence[str]) -> str | None:
    """The most recently changed socket among `names` that ends in .repair, as a path.

    Raises HelperError for a .repair entry that is a symbolic link: it could
    lead the helper, with its privileges, to a socket elsewhere.
    """
    best: tuple[int, str] | None = None
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
            best = (st.st_mtime_ns, path)
    return best[1] if best else None


class _Inotify:
    """An inotify watch for entries created in (or moved into) one directory."""

    _IN_CLOEXEC = 0o2000000
    _IN_NONBLOCK = 0o4000
    _IN_CREATE = 0x100
    _IN_MOVED_TO = 0x80
    _EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; the name follows

    def __init__(self, directory: str) -> None:
        import ctypes  # only directory mode needs it: the standard library has no inotify

        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(self._IN_CLOEXEC | self._IN_NONBLOCK)
        if fd < 0:
            raise HelperError(_oserror("inotify_init1", OSError(ctypes.get_errno(), "")))
        self.fd = fd
        if libc.inotify_add_watch(fd, os.fsencode(directory), self._IN_CREATE | self._IN_MOVED_TO) < 0:
            e = OSError(ctypes.get_errno(), "")
            self.close()
            raise HelperError(_oserror(f"inotify_add_watch {directory}", e))

    def wait(self, timeout: float | None) -> list[str]:
        """Names created since the last call; wait up to `timeout` seconds (None: forever)."""
        _stop.waiting = True
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
        finally:
            _stop.waiting = False
        if not ready:
            return []
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
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
    """Socket objects for received descriptors, made once and reused.

    Python can set a socket option only through a socket object. The kernel
    installs received descriptors at the lowest free numbers, and the helper
    opens nothing else while it serves, so every message's n descriptors are
    the n numbers from the same base up. The table keeps one object per
    number, made the first time that number arrives, so a message costs no
    object per descriptor and one close_range() closes all of it. The objects
    are views: they never close their descriptor themselves.
    """

    def __init__(self) -> None:
        self.base = -1
        self._views: list[socket.socket] = []

    def views(self, fds: Sequence[int]) -> tuple[list[socket.socket], bool]:
        """Objects for `fds`, and whether they belong to the table (else release them after use).

        #syscalls: getsockname getsockopt
        Raises OSError (ENOTSOCK) if a descriptor is not a socket.
        """
        n = len(fds)
        lo = min(fds)
        if self.base < 0:
            self.base = lo
        if lo == self.base and max(fds) == lo + n - 1:  # received descriptors are distinct
            views = self._views
            while len(views) < n:
                views.append(socket.socket(fileno=self.base + len(views)))
            return views[:n], True
        temporary: list[socket.socket] = []
        try:
            for fd in fds:
                temporary.append(socket.socket(fileno=fd))
        except BaseException:
            self.release(temporary)
            raise
        return temporary, False

    @staticmethod
    def release(views: Sequence[socket.socket]) -> None:
        """Forget objects without closing their descriptors."""
        for view in views:
            view.detach()

    def close(self) -> None:
        self.release(self._views)
        self._views.clear()


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
    without a window probe, and SwitchError is raised.
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


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> tuple[list[int], int]:
    """All descriptors in SCM_RIGHTS messages, and the number of control messages of other kinds."""
    fds = array.array("i")
    other = 0
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        else:
            other += 1
    return fds.tolist(), other


def _close_all(fds: Sequence[int]) -> None:
    """Close received descriptors: one close_range() when they are contiguous. #syscalls: close_range close"""
    if not fds:
        return
    lo, hi = min(fds), max(fds)
    if hi - lo + 1 == len(fds):
        os.closerange(lo, hi + 1)
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
    try:
        while not _stop.requested:
            try:
                _stop.waiting = True
                nbytes, ancillary, flags, _ = conn.recvmsg_into([buf], _ANC_SPACE)
            except ConnectionResetError:
                return
            except OSError as e:
                raise HelperError(_oserror("recvmsg", e)) from None
            finally:
                _stop.waiting = False
            fds, other = _received_fds(ancillary)
            try:
                if nbytes == 0 and not fds:
                    return
                started = time.perf_counter() if debug else 0.0
                command = _check(nbytes, buf, flags, fds, other)
                _apply(table, fds, command)
            finally:
                _close_all(fds)
            try:
                conn.send(buf[:1])
            except (ConnectionResetError, BrokenPipeError):
                return
            except OSError as e:
                raise HelperError(_oserror("send", e)) from None
            if debug:
                debug(f"{_NAMES[command]} on {len(fds)} sockets in {(time.perf_counter() - started) * 1e6:.0f} us")
    finally:
        table.close()


def _check(nbytes: int, buf: bytearray, flags: int, fds: list[int], other: int) -> int:
    """The command of a well-formed request, else HelperError naming what is wrong."""
    size = "1 byte" if nbytes == 1 else "more than 1 byte" if nbytes else "0 bytes"
    what = f"message of {size} with {len(fds)} descriptors"
    if flags & socket.MSG_CTRUNC:
        raise HelperError(f"{what}: control message truncated (descriptor limit reached?); nothing changed")
    if nbytes != 1:
        raise HelperError(f"{what}: a request is exactly one byte; nothing changed")
    if other:
        raise HelperError(f"{what}: unexpected control message other than SCM_RIGHTS; nothing changed")
    if not fds:
        raise HelperError(f"{what}: a request carries 1 to {SCM_MAX_FD} descriptors; nothing changed")
    try:
        return decode_command(buf[0])
    except ProtocolError as e:
        raise HelperError(f"{what}: {e}; nothing changed") from None


def _first_unreadable(views: Sequence[socket.socket]) -> int:
    """The position of the first socket whose TCP_REPAIR state cannot be read (for the message)."""
    for i, view in enumerate(views):
        try:
            view.getsockopt(SOL_TCP, TCP_REPAIR)
        except OSError:
            return i
    return 0


def _apply(table: _SocketTable, fds: list[int], command: int) -> None:
    """Switch the message's sockets, or raise HelperError naming the one that failed. #syscalls: newfstatat"""
    what = f"command {_NAMES[command]} on {len(fds)} descriptors"
    try:
        views, kept = table.views(fds)
    except OSError as e:
        position = next((i for i, fd in enumerate(fds) if not stat.S_ISSOCK(os.fstat(fd).st_mode)), 0)
        raise HelperError(_oserror(f"{what}: descriptor {position + 1}", e) + "; nothing changed") from None
    try:
        switch(views, command)
    except OSError as e:
        position = _first_unreadable(views)
        raise HelperError(
            _oserror(f"{what}: descriptor {position + 1}: getsockopt(TCP_REPAIR)", e) + "; nothing changed"
        ) from None
    except SwitchError as e:
        outcome = "nothing changed" if not e.stuck else f"{e.stuck} sockets could NOT be put back"
        raise HelperError(
            _oserror(f"{what}: descriptor {e.position + 1}: setsockopt(TCP_REPAIR)", e.error) + f"; {outcome}"
        ) from None
    finally:
        if not kept:
            table.release(views)


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
    with conn:
        pid, uid, gid = peer_credentials(conn)
        log(f"connected to {conn.getpeername() or path}: server pid {pid}, uid {uid}, gid {gid}")
        expected = owner if isinstance(peer_uid, str) else peer_uid
        if expected is not None and uid != expected:
            whose = f"the socket file's owner {expected}" if isinstance(peer_uid, str) else str(expected)
            raise HelperError(f"server pid {pid} runs as uid {uid}, not {whose} (--peer-uid): refusing it")
        if confine is not None:
            confine()
        try:
            serve(conn, log, debug)
        except Stopped:
            return


def stderr_log(message: str) -> None:
    """Write one line to stderr, unbuffered. #syscalls: write"""
    os.write(2, f"passt-repair: {message}\n".encode(errors="replace"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the passt-repair command or python -m passt_repair")
