# SPDX-License-Identifier: GPL-2.0-or-later
"""The server's sans-I/O core alone: every plan and every fault as a sequence of steps and outcomes, no sockets.

Each test plays the front: it answers the steps a plan yields from a script
and reads back the steps taken and the error raised. The fronts over this
core meet the same faults with real sockets in test_server_faults.py and
test_aio.py.
"""

from __future__ import annotations

import ast
import errno
import logging
import os
from pathlib import Path

import pytest

import passt_repair._session as session_module
from passt_repair._session import (
    CLOSED_WHILE_WAITING,
    ClosedHere,
    Deadline,
    HelperGoneError,
    HelperInfo,
    NoHelperError,
    Outcome,
    Plan,
    RepairError,
    RepairTimeoutError,
    Send,
    Session,
    Step,
    WrongReplyError,
    advance,
)
from passt_repair.protocol import SCM_MAX_FD, Command

ON, OFF, OFF_NO_WP = Command.ON, Command.OFF, Command.OFF_NO_WP
HELPER = HelperInfo(pid=4242, uid=0, gid=0)
log = logging.getLogger("test_session")


def session(reply_timeout: float = 0.5) -> Session:
    s = Session(reply_timeout, log)
    s.helper = HELPER
    return s


def name(action: object) -> str:
    if isinstance(action, Send):
        return f"send {action.batch.command.name} {len(action.batch.fds)}"
    assert isinstance(action, Step)
    return action.name.lower()


class Front:
    """Answers a plan's steps from a script of outcomes, in order, and keeps the steps' names."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.steps: list[str] = []
        self.sent: list[tuple[Command, tuple[int, ...]]] = []

    def run(self, plan: Plan) -> None:
        action = advance(plan, None)
        while action is not None:
            self.steps.append(name(action))
            if isinstance(action, Send):
                self.sent.append((action.batch.command, action.batch.fds))
            assert self.outcomes, f"the plan asked for {name(action)} after the script ended"
            action = advance(plan, self.outcomes.pop(0))
        assert not self.outcomes, "the plan ended before the script did"


def good(command: Command) -> list[Outcome]:
    """The outcomes of one confirmed batch: nothing unasked, attached, one byte sent, the echo."""
    return [None, None, 1, command.byte]


STEPS = ["idle", "attach", "send {} {}", "receive"]


def steps_of(command: Command, n: int) -> list[str]:
    return [s.format(command.name, n) for s in STEPS]


# -- plans that succeed --------------------------------------------------------------


def test_switch_sends_batches_of_253_each_confirmed_before_the_next() -> None:
    front = Front(*good(ON), *good(ON), *good(ON))
    front.run(session().switch(range(600), ON))
    assert front.steps == steps_of(ON, 253) * 2 + steps_of(ON, 94)
    assert [fds for _, fds in front.sent] == [tuple(range(253)), tuple(range(253, 506)), tuple(range(506, 600))]


def test_switch_sends_what_is_queued_first() -> None:
    s = session()
    Front().run(s.queue(7, OFF))
    assert s.queued == 1
    front = Front(*good(OFF), *good(ON))
    front.run(s.switch([1, 2], ON))
    assert front.sent == [(OFF, (7,)), (ON, (1, 2))]
    assert s.queued == 0


def test_queue_sends_at_253_and_when_the_command_changes() -> None:
    s = session()
    for fd in range(SCM_MAX_FD - 1):
        Front().run(s.queue(fd, ON))  # no step: only queued
    front = Front(*good(ON))
    front.run(s.queue(SCM_MAX_FD - 1, ON))
    assert (front.sent, s.queued) == ([(ON, tuple(range(SCM_MAX_FD)))], 0)
    Front().run(s.queue(300, ON))
    front = Front(*good(ON))
    front.run(s.queue(301, OFF_NO_WP))  # the command changes: the queued one goes first
    assert (front.sent, s.queued) == ([(ON, (300,))], 1)
    front = Front(*good(OFF_NO_WP))
    front.run(s.flush())
    front.run(s.flush())  # nothing queued: no step at all
    assert (front.sent, s.queued) == ([(OFF_NO_WP, (301,))], 0)


def test_a_helper_that_left_while_idle_is_replaced() -> None:
    """End of file between requests: nothing was lost; detach, attach another, go on."""
    front = Front(b"", None, None, 1, ON.byte)
    front.run(session().switch([5], ON))
    assert front.steps == ["idle", "detach", "attach", "send ON 1", "receive"]


def test_a_helper_that_left_while_idle_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    Front(b"", None, None, 1, ON.byte).run(session().switch([5], ON))
    assert "helper pid 4242 closed the connection while idle; attaching a new one" in caplog.text


# -- faults: every outcome that fails, at the second batch of a switch --------------------

BAD_FD = OSError(errno.EBADF, os.strerror(errno.EBADF))
RESET = ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
NOTHING_SENT = "; nothing was sent, no socket changed"
IN_DOUBT = "; 3 sockets of command ON may or may not be switched (see repair_state)"

FAULTS: dict[str, tuple[list[Outcome], type[RepairError], str, bool]] = {
    # name: (outcomes of the second batch, error, message, whether the batch is in doubt)
    "send fails": ([None, None, BAD_FD], HelperGoneError, "sending to the helper failed: Bad file descriptor", False),
    "send closed here": ([None, None, ClosedHere()], HelperGoneError, CLOSED_WHILE_WAITING, False),
    "short send": ([None, None, 0], HelperGoneError, "sending to the helper failed: 0 bytes sent", True),
    "timeout": (
        [None, None, 1, TimeoutError("timed out")],
        RepairTimeoutError,
        "no reply from the helper within 0.5 s",
        True,
    ),
    "reset": (
        [None, None, 1, RESET],
        HelperGoneError,
        "connection to the helper failed: Connection reset by peer",
        True,
    ),
    "end of file": (
        [None, None, 1, b""],
        HelperGoneError,
        "the helper closed the connection: it refused the request (see its log) or died",
        True,
    ),
    "receive closed here": ([None, None, 1, ClosedHere()], HelperGoneError, CLOSED_WHILE_WAITING, True),
    "wrong byte": ([None, None, 1, b"\x00"], WrongReplyError, "helper replied b'\\x00' to command ON (b'\\x01')", True),
    "two bytes": ([None, None, 1, b"\x01\x01"], WrongReplyError, "helper replied b'\\x01\\x01' to command ON", True),
    "minus one": ([None, None, 1, b"\xff"], WrongReplyError, "helper replied b'\\xff' to command ON", True),
    "stray byte": ([b"\x01"], WrongReplyError, "the helper sent b'\\x01' without a request", False),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_fault(fault: str) -> None:
    """The connection is closed before the error is raised; the error says what is in doubt and who was attached."""
    outcomes, kind, message, in_doubt = FAULTS[fault]
    front = Front(*good(ON), *outcomes, None)  # the last: DETACH's
    with pytest.raises(kind) as raised:
        front.run(session().switch([*range(SCM_MAX_FD), 900, 901, 902], ON))
    error = raised.value
    assert front.steps[-1] == "detach"
    assert front.steps.count("detach") == 1
    assert str(error).startswith(message)
    assert str(error).endswith(IN_DOUBT if in_doubt else NOTHING_SENT) or kind is RepairTimeoutError
    assert error.uncertain == ((900, 901, 902) if in_doubt else ())
    assert (error.confirmed, error.helper) == (SCM_MAX_FD, HELPER)


def test_a_timeout_is_a_timeout_error_and_names_the_helper_still_at_work() -> None:
    front = Front(None, None, 1, TimeoutError("timed out"), None)
    with pytest.raises(TimeoutError) as raised:
        front.run(session(reply_timeout=2.5).switch([3], ON))
    assert isinstance(raised.value, RepairTimeoutError)
    assert str(raised.value) == (
        "no reply from the helper within 2.5 s; 1 socket of command ON may or may not be switched "
        "(see repair_state) (helper pid 4242 may still be switching them until it exits)"
    )


def test_no_helper_is_raised_as_the_front_found_it() -> None:
    """A failed accept: nothing was attached, so nothing to close and nothing sent."""
    missing = NoHelperError("no passt-repair helper connected to /x within 0.01 s")
    front = Front(None, missing)
    s = session()
    s.helper = None
    with pytest.raises(NoHelperError) as raised:
        front.run(s.switch([3], ON))
    assert raised.value is missing
    assert front.steps == ["idle", "attach"]


def test_no_helper_between_two_batches_carries_what_was_confirmed() -> None:
    """The helper exits after the first batch and none comes back: the error counts the first batch."""
    missing = NoHelperError("no passt-repair helper connected to /x within 0.01 s")
    front = Front(*good(ON), b"", None, missing)  # idle: end of file; detach; attach fails
    with pytest.raises(NoHelperError) as raised:
        front.run(session().switch(range(300), ON))
    assert raised.value is missing
    assert (raised.value.confirmed, raised.value.uncertain) == (253, ())
    assert front.steps[-3:] == ["idle", "detach", "attach"]


def test_repair_on_undoes_the_first_batch_when_the_helper_is_gone_before_the_second() -> None:
    missing = NoHelperError("no passt-repair helper connected to /x within 0.01 s")
    front = Front(*good(ON), b"", None, missing, None, None, 1, OFF.byte)  # a new helper comes for the undo
    with pytest.raises(NoHelperError) as raised:
        front.run(session().repair_on(list(range(300)), OFF))
    assert front.sent[-1] == (OFF, tuple(range(253)))
    assert raised.value.confirmed == 253


def test_an_error_from_looking_at_the_idle_connection_is_raised_as_it_is() -> None:
    broken = OSError(errno.EBADF, os.strerror(errno.EBADF))
    front = Front(broken)
    with pytest.raises(OSError, match="Bad file descriptor") as raised:
        front.run(session().switch([3], ON))
    assert raised.value is broken
    assert front.steps == ["idle"]


def test_the_helper_is_named_as_it_was_when_the_batch_left() -> None:
    """A detach() during the wait (another task) forgets the helper; the error still names it."""
    s = session()
    plan = s.switch([3], ON)
    for outcome in (None, None, None):
        advance(plan, outcome)
    assert name(advance(plan, 1)) == "receive"
    s.helper = None
    assert name(advance(plan, ClosedHere())) == "detach"
    with pytest.raises(HelperGoneError) as raised:
        advance(plan, None)
    assert raised.value.helper == HELPER


# -- repair(): on, and off again for what was confirmed when switching on fails halfway -------


def test_repair_on_switches_on() -> None:
    front = Front(*good(ON), *good(ON))
    front.run(session().repair_on(list(range(300)), OFF_NO_WP))
    assert front.sent == [(ON, tuple(range(253))), (ON, tuple(range(253, 300)))]


def test_repair_on_undoes_what_was_confirmed() -> None:
    fds = list(range(300))
    refused = [None, None, 1, b"", None]  # the second batch refused; DETACH
    front = Front(*good(ON), *refused, *good(OFF_NO_WP))
    with pytest.raises(HelperGoneError, match="refused the request") as raised:
        front.run(session().repair_on(fds, OFF_NO_WP))
    assert front.sent[-1] == (OFF_NO_WP, tuple(range(253)))
    assert (raised.value.confirmed, raised.value.uncertain) == (253, tuple(range(253, 300)))
    assert "still in repair mode" not in str(raised.value)


def test_repair_on_says_what_is_left_on_when_the_undo_fails() -> None:
    fds = list(range(300))
    missing = NoHelperError("no passt-repair helper connected")
    front = Front(*good(ON), None, None, 1, b"", None, None, missing)  # refused; then no helper for the undo
    with pytest.raises(HelperGoneError) as raised:
        front.run(session().repair_on(fds, OFF))
    assert str(raised.value).endswith("; 253 sockets switched on before it are still in repair mode (no helper left)")
    assert (raised.value.confirmed, raised.value.uncertain, raised.value.helper) == (253, tuple(fds[253:]), HELPER)
    assert isinstance(raised.value.__cause__, HelperGoneError)


def test_repair_on_undoes_nothing_when_the_first_batch_fails() -> None:
    front = Front(None, None, 1, b"\x00", None)
    with pytest.raises(WrongReplyError) as raised:
        front.run(session().repair_on([1, 2], OFF))
    assert front.sent == [(ON, (1, 2))]
    assert raised.value.confirmed == 0


def test_an_error_carries_what_it_was_given() -> None:
    e = RepairError("why", [1, 2], 5, helper=HELPER)
    assert (str(e), e.uncertain, e.confirmed, e.helper) == ("why", (1, 2), 5, HELPER)
    assert repr(HELPER) == "HelperInfo(pid=4242, uid=0, gid=0)"


# -- time, passed in ----------------------------------------------------------------


def test_deadline() -> None:
    d = Deadline(100.0, 2.5)
    assert (d.left(100.0), d.left(101.0), d.left(102.5), d.left(200.0)) == (2.5, 1.5, 0, 0)
    assert Deadline(100.0, None).left(1e9) is None


def test_the_core_does_no_io_and_reads_no_clock() -> None:
    """Its imports, read from its source: no socket, select, time or asyncio."""
    tree = ast.parse(Path(session_module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "logging", "os", "collections.abc", "typing", "protocol"}
