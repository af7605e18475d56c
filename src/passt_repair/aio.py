# SPDX-License-Identifier: GPL-2.0-or-later
"""The server side of the passt-repair protocol for asyncio programs.

`AsyncRepairServer` behaves like `passt_repair.server.RepairServer` and
raises the same exceptions with the same messages, but every wait is a
coroutine, so an asyncio network program can use the helper without threads:

    async with AsyncRepairServer("/run/myapp/repair.sock") as server:
        await server.accept(timeout=5)       # a helper: passt-repair /run/myapp/repair.sock
        async with server.repair(sockets):   # repair mode on ...
            ...                              # dump, migrate
        # ... and off again, exceptions and cancellation included

Both servers carry out the same plans (`passt_repair._session`) and share
everything that does not wait; this one awaits where the other blocks.
Calls from several tasks are served one at a time, in the order they come:
the protocol has one request in flight. Every wait has a timeout. A task
cancelled while its batch is in flight closes the connection to the helper
(that batch's sockets may or may not be switched), as any other failure that
leaves the connection in doubt does. The waits use the loop's reader and
writer callbacks, so the loop must support them (any loop on Linux does).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

from ._front import Front, SocketLike, fd_of, request
from ._session import (
    ATTACH,
    RECEIVE,
    ClosedHere,
    Deadline,
    HelperInfo,
    NoHelperError,
    Outcome,
    Plan,
    Send,
    advance,
    none_in_time,
)
from .protocol import Command

__all__ = ["AsyncRepairServer"]

T = TypeVar("T")


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Wait:
    """A wait for readiness of a descriptor; `closed` once this server closed it (see `_Waits.end`)."""

    __slots__ = ("closed", "fd", "future", "loop", "write")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
        self.loop, self.fd, self.write, self.closed = loop, fd, write, False
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


class _Waits:
    """A server's waits on its sockets: one at a time (its lock allows no more), ended by closing the socket."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: _Wait | None = None

    async def call(self, sock: socket.socket, call: Callable[[], T], *, write: bool, timeout: float | None) -> T:
        """`call()` on the non-blocking `sock` once it is ready, waiting up to `timeout` seconds (None: forever).

        Raises TimeoutError as a blocking socket would, ClosedHere if `sock`
        was closed here meanwhile (`end`), and whatever else `call` raises.
        """
        deadline = None  # set at the first wait: most calls need none
        while True:
            try:
                return call()
            except BlockingIOError:
                pass
            now = time.monotonic()
            if deadline is None:
                deadline = Deadline(now, timeout)
            left = deadline.left(now)
            if left == 0:
                raise TimeoutError("timed out")
            wait = self.pending = _Wait(asyncio.get_running_loop(), sock.fileno(), write)
            try:
                # The future only signals readiness: cancelling it loses nothing, the I/O happens after.
                await asyncio.wait_for(wait.future, left)
            except asyncio.TimeoutError:
                pass  # one more try, then give up
            finally:
                if self.pending is wait:
                    self.pending = None
                    wait.end()
            if wait.closed:
                raise ClosedHere

    def end(self, sock: socket.socket) -> None:
        """`sock` is about to be closed here: the wait on it, if any, ends in ClosedHere."""
        wait = self.pending
        if wait is not None and wait.fd == sock.fileno():
            self.pending = None
            wait.closed = True
            wait.end()


class AsyncRepairServer(Front):
    """Listen for one passt-repair helper and switch sockets through it, in asyncio.

    The arguments are those of `RepairServer`: `path` to listen on (a stale
    socket file there is replaced, anything else refused), `mode` of the
    socket file (the helper needs write permission on it), `attach_timeout`
    (how long a switch waits for a helper when none is attached),
    `reply_timeout` (how long a send, and then the wait for its echo, may
    take). The socket is created at once; `close()` (or leaving `async with`)
    removes it.
    """

    _log = logging.getLogger("passt_repair.aio")

    @functools.cached_property
    def _lock(self) -> asyncio.Lock:
        return asyncio.Lock()

    @functools.cached_property
    def _waits(self) -> _Waits:
        return _Waits()

    async def accept(self, timeout: float | None = None) -> HelperInfo:
        """Wait up to `timeout` seconds (None: forever) for a helper to connect; return who it is.

        If a helper is attached already, return it at once. Raises NoHelperError on timeout
        or if the server is closed while waiting.
        """
        async with self._lock:
            return self._attached_already() or await self._accept(timeout)

    async def switch(self, sockets: Iterable[SocketLike], command: Command) -> None:
        """Set repair mode `command` on all `sockets`, in batches of at most 253, each confirmed.

        Anything queued is flushed first. On failure, raises RepairError with
        the batch in doubt (`uncertain`) and how many were confirmed before it.
        """
        async with self._lock:
            await self._run(self._session.switch(map(fd_of, sockets), Command(command)))

    async def queue(self, sock: SocketLike, command: Command) -> None:
        """Queue `sock` for `command`; send the queued batch first if the command changed, or once 253 are queued."""
        async with self._lock:
            await self._run(self._session.queue(fd_of(sock), Command(command)))

    async def flush(self) -> None:
        """Send what is queued, if anything, and wait for its confirmation."""
        async with self._lock:
            await self._run(self._session.flush())

    @contextlib.asynccontextmanager
    async def repair(
        self, sockets: Iterable[SocketLike], off: Command = Command.OFF
    ) -> AsyncIterator[list[SocketLike]]:
        """Repair mode on for `sockets` inside the block, `off` again on exit (exceptions included).

        If switching on fails halfway, the batches already switched are
        switched off again before the error is raised.
        """
        items = list(sockets)
        async with self._lock:
            await self._run(self._session.repair_on([fd_of(s) for s in items], Command(off)))
        try:
            yield items
        finally:
            await self.switch(items, off)

    async def _accept(self, timeout: float | None) -> HelperInfo:
        listener = self._listening()
        try:
            conn, _ = await self._waits.call(listener, listener.accept, write=False, timeout=timeout)
        except TimeoutError:
            raise none_in_time(self.path, timeout) from None
        except ClosedHere:
            raise NoHelperError(f"the server on {self.path} was closed while waiting for a helper") from None
        conn.setblocking(False)
        return self._take(conn)

    async def _run(self, plan: Plan) -> None:
        """Carry out the steps of `plan` until it is done (or raises); only the waits are awaited."""
        outcome: Outcome
        action = advance(plan, None)
        while action is not None:
            try:
                if isinstance(action, Send):
                    conn = self._connection()
                    send = functools.partial(conn.sendmsg, *request(action.batch))
                    outcome = await self._waits.call(conn, send, write=True, timeout=self.reply_timeout)
                elif action is RECEIVE:
                    conn = self._connection()
                    receive = functools.partial(conn.recv, 2)
                    try:
                        outcome = await self._waits.call(conn, receive, write=False, timeout=self.reply_timeout)
                    except asyncio.CancelledError:
                        self.detach()  # the reply may still come: this connection can never be trusted again
                        raise
                elif action is ATTACH:
                    if self._attached_already() is None:  # else it rejected any other helper waiting
                        await self._accept(self.attach_timeout)
                    outcome = None
                else:
                    outcome = self._now(action)
            except (OSError, ClosedHere, NoHelperError) as e:
                outcome = e
            action = advance(plan, outcome)

    def _forget(self, sock: socket.socket) -> None:
        self._waits.end(sock)

    async def __aenter__(self) -> AsyncRepairServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
