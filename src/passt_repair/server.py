# SPDX-License-Identifier: GPL-2.0-or-later
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
with a fresh helper. What each reply and each fault means is decided in
`passt_repair._session`, the same for the asyncio server (`passt_repair.aio`).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
from collections.abc import Iterable, Iterator

from ._front import Front, SocketLike, fd_of, request
from ._session import (
    ATTACH,
    RECEIVE,
    Action,
    Deadline,
    HelperGoneError,
    HelperInfo,
    NoHelperError,
    Outcome,
    Plan,
    RepairError,
    RepairTimeoutError,
    Send,
    WrongReplyError,
    advance,
    none_in_time,
)
from .protocol import SOL_TCP, TCP_REPAIR, Command

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


def repair_state(sock: SocketLike) -> bool:
    """Whether `sock` is in repair mode now (reading it needs no privilege)."""
    view = socket.socket(fileno=fd_of(sock))
    try:
        return bool(view.getsockopt(SOL_TCP, TCP_REPAIR))
    finally:
        view.detach()


class RepairServer(Front):
    """Listen for one passt-repair helper and switch sockets through it.

    `path`: where to listen (a stale socket file there is replaced). `mode`:
    permission bits of the socket file; the helper needs write permission
    on it (root passes with CAP_DAC_OVERRIDE). `attach_timeout`: how long a
    switch waits for a helper when none is attached (passt waits 10 ms).
    `reply_timeout`: how long to wait for each echo.
    """

    _log = logging.getLogger("passt_repair.server")

    def accept(self, timeout: float | None = None) -> HelperInfo:
        """Wait up to `timeout` seconds (None: forever) for a helper to connect; return who it is.

        If a helper is attached already, return it at once. Raises NoHelperError on timeout.
        """
        attached = self._attached_already()
        if attached is not None:
            return attached
        listener = self._listening()
        deadline = Deadline(time.monotonic(), timeout)
        while True:
            try:
                conn, _ = listener.accept()
                break
            except BlockingIOError:
                left = deadline.left(time.monotonic())
                if left == 0:
                    raise none_in_time(self.path, timeout) from None
                select.select([listener], [], [], left)
        conn.settimeout(self.reply_timeout)  # blocking, with a timeout on every send and receive
        return self._take(conn)

    def switch(self, sockets: Iterable[SocketLike], command: Command) -> None:
        """Set repair mode `command` on all `sockets`, in batches of at most 253, each confirmed.

        Anything queued is flushed first. On failure, raises RepairError with
        the batch in doubt (`uncertain`) and how many were confirmed before it.
        """
        self._run(self._session.switch(map(fd_of, sockets), Command(command)))

    def queue(self, sock: SocketLike, command: Command) -> None:
        """Queue `sock` for `command`; send the queued batch first if the command changed, or once 253 are queued."""
        self._run(self._session.queue(fd_of(sock), Command(command)))

    def flush(self) -> None:
        """Send what is queued, if anything, and wait for its confirmation."""
        self._run(self._session.flush())

    @contextlib.contextmanager
    def repair(self, sockets: Iterable[SocketLike], off: Command = Command.OFF) -> Iterator[list[SocketLike]]:
        """Repair mode on for `sockets` inside the block, `off` again on exit (exceptions included).

        If switching on fails halfway, the batches already switched are
        switched off again before the error is raised.
        """
        items = list(sockets)
        self._run(self._session.repair_on([fd_of(s) for s in items], Command(off)))
        try:
            yield items
        finally:
            self.switch(items, off)

    def _run(self, plan: Plan) -> None:
        """Carry out the steps of `plan` until it is done (or raises)."""
        action = advance(plan, None)
        while action is not None:
            action = advance(plan, self._do(action))

    def _do(self, action: Action) -> Outcome:
        try:
            if isinstance(action, Send):
                return self._connection().sendmsg(*request(action.batch))
            if action is RECEIVE:
                return self._connection().recv(2)
            if action is ATTACH:
                self.accept(self.attach_timeout)  # rejects any other helper waiting
                return None
            return self._now(action)
        except (OSError, NoHelperError) as e:
            return e

    def __enter__(self) -> RepairServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
