# SPDX-License-Identifier: GPL-2.0-or-later
"""A repair session without I/O: what the server sends its helper, and what every answer means.

`RepairServer` (blocking) and `AsyncRepairServer` (asyncio) own the sockets
and the clock; this module makes every decision, once for both. A switch, a
queue or a flush is a *plan*: a generator that yields the steps the front is
to carry out, is sent each step's outcome back, and ends by returning (every
batch confirmed) or by raising a RepairError. For each batch, in this order:

1. `IDLE`: outcome None if no helper is attached or it sent nothing
   since its last reply, else what it sent (b"" for end of file or a reset).
   End of file: the helper left while idle and lost nothing; it is detached
   (step 5) and another attached. Any byte: it would pass for the next reply,
   so the connection is closed and WrongReplyError raised, nothing sent.
2. `ATTACH`: accept a helper within attach_timeout if none is attached,
   and close any other that waits. Outcome None, or what the accept raised
   (NoHelperError: none came in time, or the socket file is gone), raised.
3. `Send(batch)`: sendmsg() of the command byte with the batch's descriptors.
   Outcome the number of bytes sent, or the OSError: the kernel queues a
   message whole or not at all, so a failed send reached no helper and
   changed nothing (HelperGoneError with nothing `uncertain`).
4. `RECEIVE`: the echo. Outcome the bytes read or the OSError. The
   command's own byte confirms the batch; anything else fails with the batch
   `uncertain`: a TimeoutError after reply_timeout is RepairTimeoutError, end
   of file or another error HelperGoneError, another byte WrongReplyError.
5. `DETACH`: close the connection. Asked before every failure (a
   connection in doubt is never reused) and after an end of file in step 1.

Either wait (3, 4) may also end in `ClosedHere`: the front closed the
connection meanwhile (detach() or close() from another task), which fails
with HelperGoneError, the batch `uncertain` if it was sent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterable, Sequence
from typing import NoReturn

from .protocol import Batch, BatchQueue, Command, batches


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


class ClosedHere(Exception):
    """The outcome of a wait that this server ended by closing the socket (detach, close, listen)."""


class Step:
    """What a plan asks of its front: IDLE, ATTACH, RECEIVE or DETACH (the module's docstring has each outcome)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# Plain module constants, not an Enum: a plan asks for several per message, and these are read fastest.
IDLE, ATTACH, RECEIVE, DETACH = Step("IDLE"), Step("ATTACH"), Step("RECEIVE"), Step("DETACH")


class Send:
    """Step 3: send `batch`."""

    __slots__ = ("batch",)

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __repr__(self) -> str:
        return f"Send({self.batch!r})"


Action = Step | Send
Outcome = bytes | int | Exception | None
#: A plan: it yields actions, is sent their outcomes, and returns once every batch is confirmed.
Plan = Generator[Action, Outcome, None]


def advance(plan: Plan, outcome: Outcome) -> Action | None:
    """The next step of `plan`, sent the outcome of the last one (None to start it); None once it is done."""
    try:
        return plan.send(outcome)
    except StopIteration:
        return None


class Deadline:
    """The end of a wait of `timeout` seconds (None: forever) begun at `now`; the front reads the clock."""

    __slots__ = ("end",)

    def __init__(self, now: float, timeout: float | None) -> None:
        self.end = None if timeout is None else now + timeout

    def left(self, now: float) -> float | None:
        """Seconds left at `now`, 0 once it has passed; None for a wait without end."""
        return None if self.end is None else max(0.0, self.end - now)


def none_in_time(path: str, timeout: float | None) -> NoHelperError:
    return NoHelperError(
        f"no passt-repair helper connected to {path} within {timeout:g} s (start one: passt-repair {path})"
    )


def _reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _failure(
    kind: type[RepairError], message: str, batch: Batch | None, confirmed: int, helper: HelperInfo | None
) -> RepairError:
    """The error to raise; `batch` is the request in flight, or None if none left (nothing changed)."""
    if batch is None:
        return kind(f"{message}; nothing was sent, no socket changed", (), confirmed, helper=helper)
    n = len(batch.fds)
    sockets = f"{n} socket{'s' if n != 1 else ''}"
    doubt = f"{sockets} of command {batch.command.name} may or may not be switched (see repair_state)"
    if kind is RepairTimeoutError and helper is not None:
        doubt += f" (helper pid {helper.pid} may still be switching them until it exits)"
    return kind(f"{message}; {doubt}", batch.fds, confirmed, helper=helper)


def _counted(e: Exception, confirmed: int) -> Exception:
    """`e`, raised before a batch left, carrying the sockets of the switch confirmed before it.

    A helper that exits between two batches of one switch is found at the
    next batch's IDLE step, and no other may come in time: without the count,
    repair() would not switch the confirmed batches off again.
    """
    if isinstance(e, RepairError) and not e.confirmed:
        e.confirmed = confirmed
    return e


def _left_on(e: RepairError) -> RepairError:
    """`e`, for a switch on whose confirmed batches could not be switched off again."""
    n = e.confirmed
    sockets, are = (f"{n} sockets", "are") if n != 1 else ("1 socket", "is")
    still = f"; {sockets} switched on before it {are} still in repair mode (no helper left)"
    return type(e)(f"{e}{still}", e.uncertain, e.confirmed, helper=e.helper)


CLOSED_WHILE_WAITING = "the connection to the helper was closed while waiting"


class Session:
    """One server's side of the protocol: the queue, the helper attached, and the plans.

    The front sets `helper` when it accepts one and clears it when it closes
    the connection. `reply_timeout` is only named in the timeout's message;
    the front does the waiting.
    """

    def __init__(self, reply_timeout: float, log: logging.Logger) -> None:
        self.reply_timeout = reply_timeout
        self.helper: HelperInfo | None = None
        self._log = log
        self._queue = BatchQueue()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def switch(self, fds: Iterable[int], command: Command) -> Plan:
        """Anything queued first, then `fds` in batches of at most 253, each confirmed before the next."""
        if self._queue:
            yield from self.flush()
        confirmed = 0
        for batch in batches(command, fds):
            yield from self._exchange(batch, confirmed)
            confirmed += len(batch.fds)

    def queue(self, fd: int, command: Command) -> Plan:
        """Queue `fd`; the queued batch goes first if the command changed, or once 253 are queued."""
        due = self._queue.add(fd, command)
        if due is not None:
            yield from self._exchange(due, 0)

    def flush(self) -> Plan:
        """The queued batch, if any."""
        batch = self._queue.take()
        if batch is not None:
            yield from self._exchange(batch, 0)

    def repair_on(self, fds: Sequence[int], off: Command) -> Plan:
        """Switch `fds` on; if that fails halfway, switch the confirmed ones `off` again before raising."""
        try:
            yield from self.switch(fds, Command.ON)
        except RepairError as e:
            if e.confirmed:
                try:
                    yield from self.switch(fds[: e.confirmed], off)
                except RepairError:
                    raise _left_on(e) from e
            raise

    def _exchange(self, batch: Batch, confirmed: int) -> Plan:
        """Steps 1 to 5 for one batch; `confirmed` counts the sockets of the switch confirmed before it."""
        # Each outcome is compared with the expected one first: a message that goes well costs no more.
        stray = yield IDLE
        if stray is not None:
            if isinstance(stray, Exception):
                raise _counted(stray, confirmed)  # the front could not look: nothing is known of the connection
            if stray:
                reason = f"the helper sent {stray!r} without a request"
                yield from self._fail(WrongReplyError, reason, None, confirmed, self.helper)
            pid = self.helper.pid if self.helper is not None else "?"
            self._log.warning("helper pid %s closed the connection while idle; attaching a new one", pid)
            yield DETACH
        attached = yield ATTACH
        if isinstance(attached, Exception):
            raise _counted(attached, confirmed)  # the NoHelperError of the accept, or what else it raised
        helper = self.helper  # a detach() while a wait goes on forgets it
        sent = yield Send(batch)
        if sent != 1:
            if isinstance(sent, ClosedHere):
                yield from self._fail(HelperGoneError, CLOSED_WHILE_WAITING, None, confirmed, helper)
            if isinstance(sent, OSError):
                why = f"sending to the helper failed: {_reason(sent)}"
                yield from self._fail(HelperGoneError, why, None, confirmed, helper)
            why = f"sending to the helper failed: {sent!r} bytes sent"
            yield from self._fail(HelperGoneError, why, batch, confirmed, helper)
        reply = yield RECEIVE
        if reply != batch.command.byte:
            yield from self._fail(*self._reply_fault(reply, batch.command), batch, confirmed, helper)

    def _reply_fault(self, reply: Outcome, command: Command) -> tuple[type[RepairError], str]:
        """What the outcome of RECEIVE means when it is not the command's byte: the error and why."""
        if isinstance(reply, ClosedHere):
            return HelperGoneError, CLOSED_WHILE_WAITING
        if isinstance(reply, TimeoutError):
            return RepairTimeoutError, f"no reply from the helper within {self.reply_timeout:g} s"
        if isinstance(reply, OSError):
            return HelperGoneError, f"connection to the helper failed: {_reason(reply)}"
        if not reply:
            return HelperGoneError, "the helper closed the connection: it refused the request (see its log) or died"
        return WrongReplyError, f"helper replied {reply!r} to command {command.name} ({command.byte!r})"

    @staticmethod
    def _fail(
        kind: type[RepairError], message: str, batch: Batch | None, confirmed: int, helper: HelperInfo | None
    ) -> Generator[Action, Outcome, NoReturn]:
        """Close the connection (it is in doubt: never reuse it), then raise `kind` (see `_failure`)."""
        yield DETACH
        raise _failure(kind, message, batch, confirmed, helper)
