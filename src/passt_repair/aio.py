"""The server side of the passt-repair protocol for asyncio programs.

`AsyncRepairServer` behaves like `passt_repair.server.RepairServer` and
raises the same exceptions with the same messages, but every wait is a
coroutine, so an asyncio network program can use the helper without threads:

    async with AsyncRepairServer("/run/myapp/repair.sock") as server:
        await server.accept(timeout=5)       # a helper: passt-repair /run/myapp/repair.sock
        async with server.repair(sockets):   # repair mode on ...
            ...                              # dump, migrate
        # ... and off again, exceptions and cancellation included

Everything that does not wait (the socket file, the checks of an idle
connection and of a reply, the errors and their messages) is the blocking
server's own code, from `passt_repair.server`. Calls from several tasks are
served one at a time, in the order they come: the protocol has one request
in flight. Every wait has a timeout. A task cancelled while its batch is in
flight closes the connection to the helper (that batch's sockets may or may
not be switched), as any other failure that leaves the connection in doubt
does. The waits use the loop's reader and writer callbacks, so the loop must
support them (any loop on Linux does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import NoReturn, TypeVar

from .protocol import Batch, BatchQueue, Command, batches
from .server import (
    HelperGoneError,
    HelperInfo,
    NoHelperError,
    RepairError,
    SocketLike,
    WrongReplyError,
    check_socket_file,
    failure,
    idle_fault,
    left_on,
    none_in_time,
    not_listening,
    open_listener,
    receive_fault,
    reject_waiting,
    remove_socket_file,
    reply_fault,
    request,
    send_fault,
    take_helper,
    unsolicited,
)

__all__ = ["AsyncRepairServer"]

log = logging.getLogger("passt_repair.aio")

T = TypeVar("T")

CLOSED_WHILE_WAITING = "the connection to the helper was closed while waiting"


def _fileno(sock: SocketLike) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _ClosedHere(Exception):
    """The socket a task waited on was closed by this server (detach, close, listen)."""


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
    `reply_timeout` (how long a send, and then the wait for its echo, may
    take). The socket is created at once; `close()` (or leaving `async with`)
    removes it.
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
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound
        self._queue = BatchQueue()
        self._lock = asyncio.Lock()
        self._wait: _Wait | None = None
        self.listen()

    # -- listening and accepting -------------------------------------------

    def listen(self) -> None:
        """(Re)create the listening socket at `path`; used again if the file was removed or replaced.

        A call waiting for a helper on the old socket fails with NoHelperError.
        """
        self._close_listener()
        self._listener, self._identity = open_listener(self.path, self.mode)

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
            reject_waiting(self._listener, log)
            return self.helper
        listener = self._require_listener()
        check_socket_file(self.path, self._identity)
        try:
            conn, _ = await self._when_ready(listener, listener.accept, write=False, timeout=timeout)
        except TimeoutError:
            raise none_in_time(self.path, timeout) from None
        except _ClosedHere:
            raise NoHelperError(f"the server on {self.path} was closed while waiting for a helper") from None
        conn.setblocking(False)
        self._conn = conn
        self.helper = take_helper(conn, log)
        reject_waiting(listener, log)  # helpers that raced this one into the backlog: closed now, not at a switch
        return self.helper

    def _require_listener(self) -> socket.socket:
        if self._listener is None:
            raise not_listening(self.path)
        return self._listener

    async def _attach(self, confirmed: int) -> socket.socket:
        """The helper connection, ready for a request: attach one if needed, and check the attached one.

        Nothing may arrive from an attached helper between two requests (see `idle_fault`).
        """
        if self._conn is not None and (stray := unsolicited(self._conn)) is not None:
            assert self.helper is not None
            reason = idle_fault(stray, self.helper, log)
            if reason is not None:
                self._fail(WrongReplyError, reason, None, confirmed, self.helper)
            self.detach()
        if self._conn is None:
            await self._accept(self.attach_timeout)  # rejects any other helper waiting behind the one it takes
        else:
            reject_waiting(self._listener, log)
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

    async def _when_ready(self, sock: socket.socket, call: Callable[[], T], *, write: bool, timeout: float | None) -> T:
        """`call()` on the non-blocking `sock` once it is ready, waiting up to `timeout` seconds (None: forever).

        Raises TimeoutError as a blocking socket would, _ClosedHere if `sock`
        was closed here meanwhile, and whatever else `call` raises.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if sock is not self._conn and sock is not self._listener:
                raise _ClosedHere
            try:
                return call()
            except BlockingIOError:
                pass
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("timed out")
            await self._ready(sock, write=write, timeout=left)

    async def _ready(self, sock: socket.socket, *, write: bool, timeout: float | None) -> None:
        """Wait until `sock` is readable (or writable), it is closed here, or `timeout` seconds have passed."""
        wait = _Wait(asyncio.get_running_loop(), sock.fileno(), write)
        self._wait = wait
        try:
            # The future only signals readiness: cancelling it loses nothing, the I/O happens after.
            await asyncio.wait_for(wait.future, timeout)
        except asyncio.TimeoutError:
            pass  # the caller tries once more, then gives up
        finally:
            if self._wait is wait:
                self._wait = None
                wait.end()

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
                    raise left_on(e) from e
            raise
        try:
            yield items
        finally:
            await self.switch(items, off)

    async def _send(self, batch: Batch, confirmed: int) -> None:
        conn = await self._attach(confirmed)
        helper = self.helper  # a detach() while we wait forgets it
        timeout = self.reply_timeout
        try:
            sent = await self._when_ready(conn, lambda: conn.sendmsg(*request(batch)), write=True, timeout=timeout)
        except _ClosedHere:
            self._fail(HelperGoneError, CLOSED_WHILE_WAITING, None, confirmed, helper)
        except OSError as e:
            # The kernel queues a message whole or not at all: a failed send reached no helper.
            self._fail(HelperGoneError, send_fault(e), None, confirmed, helper)
        if sent != 1:
            self._fail(HelperGoneError, send_fault(sent), batch, confirmed, helper)
        try:
            reply = await self._when_ready(conn, lambda: conn.recv(2), write=False, timeout=timeout)
        except asyncio.CancelledError:
            self.detach()  # the reply may still come: this connection can never be trusted again
            raise
        except _ClosedHere:
            self._fail(HelperGoneError, CLOSED_WHILE_WAITING, batch, confirmed, helper)
        except OSError as e:
            self._fail(*receive_fault(e, timeout), batch, confirmed, helper)
        fault = reply_fault(reply, batch.command)
        if fault is not None:
            self._fail(*fault, batch, confirmed, helper)

    def _fail(
        self, kind: type[RepairError], message: str, batch: Batch | None, confirmed: int, helper: HelperInfo | None
    ) -> NoReturn:
        """Close the connection (it is in doubt: never reuse it) and raise `kind` (see `failure`)."""
        self.detach()
        raise failure(kind, message, batch, confirmed, helper)

    # -- closing -----------------------------------------------------------

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        self._end_wait(self._listener)
        self._listener.close()
        self._listener = None
        remove_socket_file(self.path, self._identity)

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
