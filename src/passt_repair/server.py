"""The server side of the passt-repair protocol: what passt does, for Python programs.

A server without CAP_NET_ADMIN listens on a UNIX socket, accepts one
passt-repair helper, and has it switch TCP_REPAIR on its sockets:

    with RepairServer("/run/myapp/repair.sock") as server:
        server.accept(timeout=5)             # a helper: passt-repair /run/myapp/repair.sock
        with server.repair(sockets):         # repair mode on ...
            ...                              # dump, migrate
        # ... and off again, exceptions included

Sockets are sent in batches of at most 253 (one message each) and every
reply is checked. `queue` and `flush` batch the way passt does: a batch goes
out when the command changes, when 253 are queued, or on demand. Every wait
has a timeout; every failure raises a RepairError subclass, and any failure
that leaves the connection in doubt closes it, so the next call starts clean
with a fresh helper.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import NoReturn, Protocol

from .protocol import SOL_TCP, TCP_REPAIR, Batch, BatchQueue, Command, batches

__all__ = [
    "HelperGoneError",
    "HelperInfo",
    "NoHelperError",
    "RepairError",
    "RepairServer",
    "RepairTimeoutError",
    "SocketLike",
    "WrongReplyError",
    "repair_state",
]

log = logging.getLogger("passt_repair.server")


class HasFileno(Protocol):
    def fileno(self) -> int: ...


#: A socket object or a bare descriptor.
SocketLike = HasFileno | int


class RepairError(Exception):
    """A switch through the helper failed.

    `uncertain` holds the descriptors of the batch that was in flight when
    the failure happened: the helper may have switched all of them, none, or
    (if it was killed halfway) some; read them with `repair_state`. It is
    empty when the request never left (nothing changed). Batches before it
    were switched and confirmed; `confirmed` counts their descriptors.
    `helper` is the helper that was attached, if any: after a timeout it may
    still be working on the batch until that process exits.
    """

    def __init__(
        self, message: str, uncertain: Sequence[int] = (), confirmed: int = 0, *, helper: HelperInfo | None = None
    ) -> None:
        super().__init__(message)
        self.uncertain = tuple(uncertain)
        self.confirmed = confirmed
        self.helper = helper


class NoHelperError(RepairError):
    """No helper is attached and none connected in time."""


class HelperGoneError(RepairError):
    """The helper closed the connection or it broke (the helper refused a request, or died)."""


class WrongReplyError(RepairError):
    """The helper answered with a byte other than the command."""


class RepairTimeoutError(RepairError, TimeoutError):
    """The helper did not answer in time."""


class HelperInfo:
    """The helper process at the other end, from SO_PEERCRED."""

    __slots__ = ("gid", "pid", "uid")

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.pid, self.uid, self.gid = pid, uid, gid

    def __repr__(self) -> str:
        return f"HelperInfo(pid={self.pid}, uid={self.uid}, gid={self.gid})"


def _fd(sock: SocketLike) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def repair_state(sock: SocketLike) -> bool:
    """Whether `sock` is in repair mode now (reading it needs no privilege)."""
    fd = _fd(sock)
    view = socket.socket(fileno=fd)
    try:
        return bool(view.getsockopt(SOL_TCP, TCP_REPAIR))
    finally:
        view.detach()


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the socket file at `path`, or None if there is none (or something else is there)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def _reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def peer_info(conn: socket.socket) -> HelperInfo:
    pid, uid, gid = struct.unpack("iII", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return HelperInfo(pid, uid, gid)


def prepare_path(path: str) -> None:
    """Make room for a new listening socket at `path`.

    A socket file nobody listens on (left by a server that died) is removed.
    Anything else at the path is left alone and refused: a live socket, a
    regular file, a directory.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody listens
        log.info("removed stale socket %s", path)
        return
    except BlockingIOError:
        pass  # a live listener with a full queue
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")


# -- what the blocking and the asyncio server share: nothing here waits ------------


def open_listener(path: str, mode: int) -> tuple[socket.socket, tuple[int, int] | None]:
    """A non-blocking socket listening at `path` with backlog 0 (as passt), and the identity of its file."""
    prepare_path(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        listener.bind(path)
        os.chmod(path, mode)
        listener.listen(0)
        return listener, _identity(path)
    except BaseException:
        listener.close()
        raise


def check_socket_file(path: str, identity: tuple[int, int] | None) -> None:
    """Raise NoHelperError if our socket file (`identity`) is gone from `path`: no new helper could reach us."""
    found = _identity(path)
    if found is None or found != identity:
        what = "was removed" if not os.path.lexists(path) else "was replaced by another file"
        raise NoHelperError(f"repair socket {path} {what}: no helper can connect; call listen() to recreate it")


def remove_socket_file(path: str, identity: tuple[int, int] | None) -> None:
    """Remove the socket file we bound (`identity`) from `path`; never a file that replaced it."""
    if identity is not None and _identity(path) == identity:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def not_listening(path: str) -> NoHelperError:
    return NoHelperError(f"not listening on {path} (closed); call listen()")


def none_in_time(path: str, timeout: float | None) -> NoHelperError:
    return NoHelperError(
        f"no passt-repair helper connected to {path} within {timeout:g} s (start one: passt-repair {path})"
    )


def take_helper(conn: socket.socket, logger: logging.Logger) -> HelperInfo:
    """Who the helper on a newly accepted `conn` is; logged."""
    info = peer_info(conn)
    logger.info("helper attached: pid %d, uid %d, gid %d", info.pid, info.uid, info.gid)
    return info


def reject_waiting(listener: socket.socket | None, logger: logging.Logger) -> None:
    """Accept and close any other helper that connected while one is attached (passt does the same)."""
    if listener is None:
        return
    while True:
        try:
            extra, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        with extra:
            info = peer_info(extra)
            logger.warning("rejected a second helper: pid %d, uid %d (one is attached already)", info.pid, info.uid)


def unsolicited(conn: socket.socket) -> bytes | None:
    """What the helper sent unasked: None if nothing, b"" if it closed the connection."""
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    if not poller.poll(0):
        return None
    try:
        return conn.recv(16)
    except OSError:
        return b""  # reset: as closed


def idle_fault(stray: bytes, helper: HelperInfo, logger: logging.Logger) -> str | None:
    """What `stray` bytes from an idle helper mean: the reason to fail, or None if it merely closed (logged).

    A helper that closed the connection while idle (stopped, killed) lost no
    request: a new one may take its place. Bytes nobody asked for would be
    taken for the next reply, so they end the connection.
    """
    if stray:
        return f"the helper sent {stray!r} without a request"
    logger.warning("helper pid %d closed the connection while idle; attaching a new one", helper.pid)
    return None


def request(batch: Batch) -> tuple[list[bytes], list[tuple[int, int, bytes]], int]:
    """The arguments of sendmsg() for `batch`: its command byte, its descriptors, its flags."""
    rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch.fds).tobytes())
    return [batch.command.byte], [rights], socket.MSG_NOSIGNAL


def send_fault(error: OSError | int) -> str:
    """Why a send failed: the error sendmsg() raised, or how many bytes it sent instead of one."""
    why = _reason(error) if isinstance(error, OSError) else f"{error} bytes sent"
    return f"sending to the helper failed: {why}"


def receive_fault(error: OSError, reply_timeout: float) -> tuple[type[RepairError], str]:
    """What a failed wait for the reply means (a TimeoutError after `reply_timeout`, or a broken connection)."""
    if isinstance(error, TimeoutError):
        return RepairTimeoutError, f"no reply from the helper within {reply_timeout:g} s"
    return HelperGoneError, f"connection to the helper failed: {_reason(error)}"


def reply_fault(reply: bytes, command: Command) -> tuple[type[RepairError], str] | None:
    """What the reply to `command` means: None if the helper confirmed it, else the error and why."""
    if not reply:
        return HelperGoneError, "the helper closed the connection: it refused the request (see its log) or died"
    if reply != command.byte:
        return WrongReplyError, f"helper replied {reply!r} to command {command.name} ({command.byte!r})"
    return None


def failure(
    kind: type[RepairError], message: str, batch: Batch | None, confirmed: int, helper: HelperInfo | None
) -> RepairError:
    """The error to raise; `batch` is the request in flight, or None if none left (nothing changed)."""
    if batch is None:
        return kind(f"{message}; nothing was sent, no socket changed", (), confirmed, helper=helper)
    doubt = f"{len(batch.fds)} sockets of command {batch.command.name} may or may not be switched (see repair_state)"
    if kind is RepairTimeoutError and helper is not None:
        doubt += f" (helper pid {helper.pid} may still be switching them until it exits)"
    return kind(f"{message}; {doubt}", batch.fds, confirmed, helper=helper)


def left_on(e: RepairError) -> RepairError:
    """`e`, for a switch on whose confirmed batches could not be switched off again."""
    still = f"; {e.confirmed} sockets switched on before it are still in repair mode (no helper left)"
    return type(e)(f"{e}{still}", e.uncertain, e.confirmed, helper=e.helper)


class RepairServer:
    """Listen for one passt-repair helper and switch sockets through it.

    `path`: where to listen (a stale socket file there is replaced). `mode`:
    permission bits of the socket file; the helper needs write permission
    on it (root passes with CAP_DAC_OVERRIDE). `attach_timeout`: how long a
    switch waits for a helper when none is attached (passt waits 10 ms).
    `reply_timeout`: how long to wait for each echo.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: int = 0o600,
        attach_timeout: float = 0.01,
        reply_timeout: float = 5.0,
    ) -> None:
        self.path = os.fspath(path)
        self.mode = mode
        self.attach_timeout = attach_timeout
        self.reply_timeout = reply_timeout
        self.helper: HelperInfo | None = None
        self._conn: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound
        self._queue = BatchQueue()
        self.listen()

    # -- listening and accepting -------------------------------------------

    def listen(self) -> None:
        """(Re)create the listening socket at `path`; used again if the file was removed or replaced."""
        self._close_listener()
        self._listener, self._identity = open_listener(self.path, self.mode)

    @property
    def attached(self) -> bool:
        """Whether a helper is connected."""
        return self._conn is not None

    def accept(self, timeout: float | None = None) -> HelperInfo:
        """Wait up to `timeout` seconds (None: forever) for a helper to connect; return who it is.

        If a helper is attached already, return it at once. Raises NoHelperError on timeout.
        """
        if self._conn is not None and self.helper is not None:
            reject_waiting(self._listener, log)
            return self.helper
        listener = self._require_listener()
        check_socket_file(self.path, self._identity)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                conn, _ = listener.accept()
                break
            except BlockingIOError:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise none_in_time(self.path, timeout) from None
                select.select([listener], [], [], left)
        conn.settimeout(self.reply_timeout)  # blocking, with a timeout on every send and receive
        self._conn = conn
        self.helper = take_helper(conn, log)
        reject_waiting(listener, log)  # helpers that raced this one into the backlog: closed now, not at a switch
        return self.helper

    def _require_listener(self) -> socket.socket:
        if self._listener is None:
            raise not_listening(self.path)
        return self._listener

    def _attach(self, confirmed: int) -> socket.socket:
        """The helper connection, ready for a request: attach one if needed, and check the attached one.

        Nothing may arrive from an attached helper between two requests (see `idle_fault`).
        """
        if self._conn is not None and (stray := unsolicited(self._conn)) is not None:
            assert self.helper is not None
            reason = idle_fault(stray, self.helper, log)
            if reason is not None:
                self._fail(WrongReplyError, reason, None, confirmed)
            self.detach()
        if self._conn is None:
            self.accept(self.attach_timeout)  # rejects any other helper waiting behind the one it takes
        else:
            reject_waiting(self._listener, log)
        assert self._conn is not None
        return self._conn

    def detach(self) -> None:
        """Close the connection to the helper (it exits 0); a new helper can then attach."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self.helper = None

    # -- switching ---------------------------------------------------------

    def switch(self, sockets: Iterable[SocketLike], command: Command) -> None:
        """Set repair mode `command` on all `sockets`, in batches of at most 253, each confirmed.

        Anything queued is flushed first. On failure, raises RepairError with
        the batch in doubt (`uncertain`) and how many were confirmed before it.
        """
        self.flush()
        done = 0
        for batch in batches(Command(command), (_fd(s) for s in sockets)):
            self._send(batch, done)
            done += len(batch.fds)

    def queue(self, sock: SocketLike, command: Command) -> None:
        """Queue `sock` for `command`; send the queued batch first if the command changed, or once 253 are queued."""
        due = self._queue.add(_fd(sock), Command(command))
        if due is not None:
            self._send(due, 0)

    def flush(self) -> None:
        """Send what is queued, if anything, and wait for its confirmation."""
        batch = self._queue.take()
        if batch is not None:
            self._send(batch, 0)

    @property
    def queued(self) -> int:
        """How many sockets wait in the queue."""
        return len(self._queue)

    @contextlib.contextmanager
    def repair(self, sockets: Iterable[SocketLike], off: Command = Command.OFF) -> Iterator[list[SocketLike]]:
        """Repair mode on for `sockets` inside the block, `off` again on exit (exceptions included).

        If switching on fails halfway, the batches already switched are
        switched off again before the error is raised.
        """
        items = list(sockets)
        try:
            self.switch(items, Command.ON)
        except RepairError as e:
            if e.confirmed:
                try:
                    self.switch(items[: e.confirmed], off)
                except RepairError:
                    raise left_on(e) from e
            raise
        try:
            yield items
        finally:
            self.switch(items, off)

    def _send(self, batch: Batch, confirmed: int) -> None:
        conn = self._attach(confirmed)
        try:
            sent = conn.sendmsg(*request(batch))
        except OSError as e:
            # The kernel queues a message whole or not at all: a failed send reached no helper.
            self._fail(HelperGoneError, send_fault(e), None, confirmed)
        if sent != 1:
            self._fail(HelperGoneError, send_fault(sent), batch, confirmed)
        try:
            reply = conn.recv(2)
        except OSError as e:
            self._fail(*receive_fault(e, self.reply_timeout), batch, confirmed)
        fault = reply_fault(reply, batch.command)
        if fault is not None:
            self._fail(*fault, batch, confirmed)

    def _fail(self, kind: type[RepairError], message: str, batch: Batch | None, confirmed: int) -> NoReturn:
        """Close the connection (it is in doubt: never reuse it) and raise `kind` (see `failure`)."""
        helper = self.helper
        self.detach()
        raise failure(kind, message, batch, confirmed, helper)

    # -- closing -----------------------------------------------------------

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        remove_socket_file(self.path, self._identity)

    def close(self) -> None:
        """Close the helper connection and the listening socket, and remove the socket file we made."""
        self.detach()
        self._close_listener()

    def __enter__(self) -> RepairServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
