"""The server side of the passt-repair protocol for asyncio programs.

`AsyncRepairServer` behaves like `passt_repair.server.RepairServer` and
raises the same exceptions, but every wait is a coroutine, so an asyncio
network program can use the helper without threads:

    async with AsyncRepairServer("/run/myapp/repair.sock") as server:
        await server.accept(timeout=5)       # a helper: passt-repair /run/myapp/repair.sock
        async with server.repair(sockets):   # repair mode on ...
            ...                              # dump, migrate
        # ... and off again, exceptions and cancellation included

Calls from several tasks are served one at a time, in the order they come:
the protocol has one request in flight. Every wait has a timeout. A task
cancelled while a batch is in flight closes the connection to the helper
(that batch's sockets may or may not be switched), as any other failure that
leaves the connection in doubt does. The waits use the loop's reader and
writer callbacks, so the loop must support them (any loop on Linux does).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable
from typing import NoReturn

from .protocol import Batch, BatchQueue, Command, batches
from .server import (
    HelperGoneError,
    HelperInfo,
    NoHelperError,
    RepairError,
    RepairTimeoutError,
    SocketLike,
    WrongReplyError,
    peer_info,
    prepare_path,
)

__all__ = ["AsyncRepairServer"]

log = logging.getLogger("passt_repair.aio")


def _fileno(sock: SocketLike) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Wait:
    """The one pending wait for readiness of a descriptor (the lock allows no more)."""

    __slots__ = ("fd", "future", "loop", "write")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
        self.loop, self.fd, self.write = loop, fd, write
        self.future: asyncio.Future[None] = loop.create_future()
        if write:
            loop.add_writer(fd, _wake, self.future)
        else:
            loop.add_reader(fd, _wake, self.future)

    def end(self) -> None:
        """Stop watching the descriptor and wake the waiter (it then finds out why)."""
        if self.write:
            self.loop.remove_writer(self.fd)
        else:
            self.loop.remove_reader(self.fd)
        _wake(self.future)


class AsyncRepairServer:
    """Listen for one passt-repair helper and switch sockets through it, in asyncio.

    The arguments are those of `RepairServer`: `path` to listen on (a stale
    socket file there is replaced, anything else refused), `mode` of the
    socket file (the helper needs write permission on it), `attach_timeout`
    (how long a switch waits for a helper when none is attached),
    `reply_timeout` (how long each batch waits for its echo). The socket is
    created at once; `close()` (or leaving `async with`) removes it.
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
        #: The attached helper, from SO_PEERCRED; None when none is attached.
        self.helper: HelperInfo | None = None
        self._conn: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._inode = 0
        self._queue = BatchQueue()
        self._lock = asyncio.Lock()
        self._wait: _Wait | None = None
        self.listen()

    # -- listening and accepting -------------------------------------------

    def listen(self) -> None:
        """(Re)create the listening socket at `path`; used again if the file was removed or replaced."""
        self._close_listener()
        prepare_path(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            listener.bind(self.path)
            os.chmod(self.path, self.mode)
            listener.listen(0)
            self._inode = os.stat(self.path).st_ino
        except BaseException:
            listener.close()
            raise
        self._listener = listener

    @property
    def attached(self) -> bool:
        """Whether a helper is connected."""
        return self._conn is not None

    async def accept(self, timeout: float | None = None) -> HelperInfo:
        """Wait up to `timeout` seconds (None: forever) for a helper to connect; return who it is.

        If a helper is attached already, return it at once. Raises NoHelperError on timeout
        or if the server is closed while waiting.
        """
        async with self._lock:
            return await self._accept(timeout)

    async def _accept(self, timeout: float | None) -> HelperInfo:
        if self._conn is not None and self.helper is not None:
            self._reject_extra()
            return self.helper
        listener = self._require_listener()
        self._check_path()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                conn, _ = listener.accept()
                break
            except BlockingIOError:
                pass
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise NoHelperError(
                    f"no passt-repair helper connected to {self.path} within {timeout:g} s "
                    f"(start one: passt-repair {self.path})"
                )
            await self._ready(listener, write=False, timeout=left)
            if self._listener is not listener:
                raise NoHelperError(f"the server on {self.path} was closed while waiting for a helper")
        conn.setblocking(False)
        self._conn = conn
        self.helper = peer_info(conn)
        log.info("helper attached: pid %d, uid %d, gid %d", self.helper.pid, self.helper.uid, self.helper.gid)
        return self.helper

    def _check_path(self) -> None:
        try:
            same = os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            same = False
        if not same:
            raise NoHelperError(f"repair socket {self.path} was removed or replaced; call listen() to recreate it")

    def _require_listener(self) -> socket.socket:
        if self._listener is None:
            raise NoHelperError(f"not listening on {self.path} (closed); call listen()")
        return self._listener

    def _reject_extra(self) -> None:
        """Accept and close any other helper that connected while one is attached (passt does the same)."""
        if self._listener is None:
            return
        while True:
            try:
                extra, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            with extra:
                info = peer_info(extra)
                log.warning("rejected a second helper: pid %d, uid %d (one is attached already)", info.pid, info.uid)

    async def _attach(self) -> socket.socket:
        if self._conn is None:
            await self._accept(self.attach_timeout)
        else:
            self._reject_extra()
        assert self._conn is not None
        return self._conn

    def detach(self) -> None:
        """Close the connection to the helper (it exits 0); a new helper can then attach.

        A switch waiting for its reply fails with HelperGoneError.
        """
        if self._conn is not None:
            self._end_wait(self._conn)
            self._conn.close()
            self._conn = None
            self.helper = None

    # -- waiting -----------------------------------------------------------

    async def _ready(self, sock: socket.socket, *, write: bool, timeout: float | None) -> bool:
        """Wait until `sock` is readable (or writable); False after `timeout` seconds."""
        wait = _Wait(asyncio.get_running_loop(), sock.fileno(), write)
        self._wait = wait
        try:
            # The future only signals readiness: cancelling it loses nothing, the I/O happens after.
            await asyncio.wait_for(wait.future, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            if self._wait is wait:
                self._wait = None
                wait.end()
        return True

    def _end_wait(self, sock: socket.socket) -> None:
        wait = self._wait
        if wait is not None and wait.fd == sock.fileno():
            self._wait = None
            wait.end()

    # -- switching ---------------------------------------------------------

    async def switch(self, sockets: Iterable[SocketLike], command: Command) -> None:
        """Set repair mode `command` on all `sockets`, in batches of at most 253, each confirmed.

        Anything queued is flushed first. On failure, raises RepairError with
        the batch in doubt (`uncertain`) and how many were confirmed before it.
        """
        async with self._lock:
            await self._flush()
            done = 0
            for batch in batches(Command(command), (_fileno(s) for s in sockets)):
                await self._send(batch, done)
                done += len(batch.fds)

    async def queue(self, sock: SocketLike, command: Command) -> None:
        """Queue `sock` for `command`; send the queued batch first if the command changed, or once 253 are queued."""
        async with self._lock:
            due = self._queue.add(_fileno(sock), Command(command))
            if due is not None:
                await self._send(due, 0)

    async def flush(self) -> None:
        """Send what is queued, if anything, and wait for its confirmation."""
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        batch = self._queue.take()
        if batch is not None:
            await self._send(batch, 0)

    @property
    def queued(self) -> int:
        """How many sockets wait in the queue."""
        return len(self._queue)

    @contextlib.asynccontextmanager
    async def repair(
        self, sockets: Iterable[SocketLike], off: Command = Command.OFF
    ) -> AsyncIterator[list[SocketLike]]:
        """Repair mode on for `sockets` inside the block, `off` again on exit (exceptions included).

        If switching on fails halfway, the batches already switched are
        switched off again before the error is raised.
        """
        items = list(sockets)
        try:
            await self.switch(items, Command.ON)
        except RepairError as e:
            if e.confirmed:
                try:
                    await self.switch(items[: e.confirmed], off)
                except RepairError:
                    still = f"; {e.confirmed} sockets switched on before it are still in repair mode (no helper left)"
                    raise type(e)(f"{e}{still}", e.uncertain, e.confirmed) from e
            raise
        try:
            yield items
        finally:
            await self.switch(items, off)

    async def _send(self, batch: Batch, confirmed: int) -> None:
        conn = await self._attach()
        command = batch.command
        deadline = time.monotonic() + self.reply_timeout
        try:
            reply = await self._exchange(conn, batch, deadline)
        except asyncio.CancelledError:
            self.detach()  # the reply may still come: this connection can never be trusted again
            raise
        except TimeoutError:
            self._fail(
                RepairTimeoutError, f"no reply from the helper within {self.reply_timeout:g} s", batch, confirmed
            )
        except OSError as e:
            self._fail(
                HelperGoneError,
                f"connection to the helper failed: {os.strerror(e.errno or errno.EIO)}",
                batch,
                confirmed,
            )
        if reply is None:
            self._fail(HelperGoneError, "the connection to the helper was closed while waiting", batch, confirmed)
        if not reply:
            self._fail(
                HelperGoneError,
                "the helper closed the connection: it refused the request (see its log) or died",
                batch,
                confirmed,
            )
        if reply != command.byte:
            self._fail(
                WrongReplyError,
                f"helper replied {reply!r} to command {command.name} ({command.byte!r})",
                batch,
                confirmed,
            )

    async def _exchange(self, conn: socket.socket, batch: Batch, deadline: float) -> bytes | None:
        """Send `batch` and return the reply; None if the connection was closed meanwhile.

        Raises TimeoutError at `deadline`, OSError if the connection fails.
        """
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch.fds).tobytes())]
        while True:
            try:
                sent = conn.sendmsg([batch.command.byte], rights, socket.MSG_NOSIGNAL)
                break
            except BlockingIOError:
                await self._wait_until(conn, write=True, deadline=deadline)
            if self._conn is not conn:
                return None
        if sent != 1:
            raise OSError(errno.EIO, "short send")
        while True:
            try:
                return conn.recv(2)
            except BlockingIOError:
                await self._wait_until(conn, write=False, deadline=deadline)
            if self._conn is not conn:
                return None

    async def _wait_until(self, conn: socket.socket, *, write: bool, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or not await self._ready(conn, write=write, timeout=left):
            raise TimeoutError

    def _fail(self, kind: type[RepairError], message: str, batch: Batch, confirmed: int) -> NoReturn:
        self.detach()  # the connection is in doubt: never reuse it
        raise kind(
            f"{message}; {len(batch.fds)} sockets of command {batch.command.name} may or may not be switched",
            batch.fds,
            confirmed,
        )

    # -- closing -----------------------------------------------------------

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        self._end_wait(self._listener)
        self._listener.close()
        self._listener = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Close the helper connection and the listening socket, and remove the socket file we made.

        A call waiting for a helper or a reply fails with a RepairError.
        """
        self.detach()
        self._close_listener()

    async def __aenter__(self) -> AsyncRepairServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
