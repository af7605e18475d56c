# SPDX-License-Identifier: GPL-2.0-or-later
"""What RepairServer and AsyncRepairServer share: their sockets, and every step of a plan that does not wait.

The socket file and the listening socket, the connection to the helper, and
a `Session` (`_session`) that decides everything else. A front adds the
waits: accepting, sending, receiving.
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
from typing import Protocol

from ._session import DETACH, HelperInfo, NoHelperError, Outcome, Session, Step
from .protocol import Batch


class HasFileno(Protocol):
    def fileno(self) -> int: ...


#: A socket object or a bare descriptor (passt_repair.server exports it).
SocketLike = HasFileno | int


def fd_of(sock: SocketLike) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the socket file at `path`, or None if there is none (or something else is there)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def prepare_path(path: str, log: logging.Logger) -> None:
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


def request(batch: Batch) -> tuple[list[bytes], list[tuple[int, int, bytes]], int]:
    """The arguments of sendmsg() for `batch`: its command byte, its descriptors, its flags."""
    rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch.fds).tobytes())
    return [batch.command.byte], [rights], socket.MSG_NOSIGNAL


class Front:
    """The state both servers keep, and what they do alike; `_log` is the front's logger."""

    _log: logging.Logger

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
        self._session = Session(reply_timeout, self._log)
        self._conn: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound
        self.listen()

    @property
    def reply_timeout(self) -> float:
        """How long a send, and then the wait for its echo, may take (seconds)."""
        return self._session.reply_timeout

    @reply_timeout.setter
    def reply_timeout(self, seconds: float) -> None:
        self._session.reply_timeout = seconds

    @property
    def helper(self) -> HelperInfo | None:
        """The attached helper, from SO_PEERCRED; None when none is attached."""
        return self._session.helper

    @property
    def attached(self) -> bool:
        """Whether a helper is connected."""
        return self._conn is not None

    @property
    def queued(self) -> int:
        """How many sockets wait in the queue."""
        return self._session.queued

    def listen(self) -> None:
        """(Re)create the listening socket at `path`; used again if the file was removed or replaced.

        A call waiting for a helper on the old socket fails with NoHelperError.
        """
        self._close_listener()
        prepare_path(self.path, self._log)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            listener.bind(self.path)
            os.chmod(self.path, self.mode)
            listener.listen(0)  # backlog 0, as passt
        except BaseException:
            listener.close()
            raise
        self._listener, self._identity = listener, _identity(self.path)

    def detach(self) -> None:
        """Close the connection to the helper (it exits 0); a new helper can then attach.

        A switch waiting for its reply fails with HelperGoneError.
        """
        if self._conn is not None:
            self._forget(self._conn)
            self._conn.close()
            self._conn = None
            self._session.helper = None

    def close(self) -> None:
        """Close the helper connection and the listening socket, and remove the socket file we made.

        A call waiting for a helper or a reply fails with a RepairError.
        """
        self.detach()
        self._close_listener()

    def _forget(self, sock: socket.socket) -> None:
        """`sock` is about to be closed: end any wait on it (the asyncio front has some)."""

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        self._forget(self._listener)
        self._listener.close()
        self._listener = None
        if self._identity is not None and _identity(self.path) == self._identity:  # ours, not a file that replaced it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # -- accepting: before and after the wait ------------------------------------

    def _attached_already(self) -> HelperInfo | None:
        """The attached helper, with any other that waits rejected; None if none is attached."""
        if self._conn is None or self.helper is None:
            return None
        self._reject_waiting()
        return self.helper

    def _listening(self) -> socket.socket:
        """The listening socket, checked: NoHelperError if it is closed or its file is gone."""
        if self._listener is None:
            raise NoHelperError(f"not listening on {self.path} (closed); call listen()")
        found = _identity(self.path)
        if found is None or found != self._identity:
            what = "was removed" if not os.path.lexists(self.path) else "was replaced by another file"
            why = f"repair socket {self.path} {what}: no helper can connect; call listen() to recreate it"
            raise NoHelperError(why)
        return self._listener

    def _take(self, conn: socket.socket) -> HelperInfo:
        """Attach the newly accepted `conn`; who it is, logged."""
        self._conn = conn
        info = self._session.helper = _peer(conn)
        self._log.info("helper attached: pid %d, uid %d, gid %d", info.pid, info.uid, info.gid)
        self._reject_waiting()  # helpers that raced this one into the backlog: closed now, not at a switch
        return info

    def _reject_waiting(self) -> None:
        """Accept and close any other helper that connected while one is attached (passt does the same)."""
        if self._listener is None:
            return
        while True:
            try:
                extra, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            with extra:
                info = _peer(extra)
                why = "rejected a second helper: pid %d, uid %d (one is attached already)"
                self._log.warning(why, info.pid, info.uid)

    # -- the steps that do not wait --------------------------------------------------

    def _connection(self) -> socket.socket:
        assert self._conn is not None, "a plan sends and receives only after ATTACH"
        return self._conn

    def _now(self, step: Step) -> Outcome:
        """Carry out IDLE or DETACH."""
        if step is DETACH:
            self.detach()
            return None
        if self._conn is None:
            return None
        poller = select.poll()
        poller.register(self._conn, select.POLLIN)
        if not poller.poll(0):
            return None
        try:
            return self._conn.recv(16)
        except OSError:
            return b""  # reset: as closed


def _peer(conn: socket.socket) -> HelperInfo:
    pid, uid, gid = struct.unpack("iII", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return HelperInfo(pid, uid, gid)
