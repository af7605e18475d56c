# SPDX-License-Identifier: GPL-2.0-or-later
"""AsyncRepairServer against the installed helper (and a fake one where the helper cannot misbehave).

Every state is read back from the kernel with getsockopt(TCP_REPAIR); every
batch the helper received is read from its --debug log. The faults are those
of test_server_faults.py, met by the asyncio server: while it waits, the
event loop goes on (a task of the test kills the helper, or polls /proc).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import resource
import select
import signal
import socket
import stat
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path

import pytest

from passt_repair import (
    SCM_MAX_FD,
    AsyncRepairServer,
    Command,
    HelperGoneError,
    NoHelperError,
    RepairTimeoutError,
    WrongReplyError,
    repair_state,
)
from support import CONNECT, RECVMSG, FakeHelper, Helper, TcpPairs, error_lines, have, states, syscall

ON, OFF, OFF_NO_WP = Command.ON, Command.OFF, Command.OFF_NO_WP
DEBUG_LINE = re.compile(r"passt-repair: (ON|OFF|OFF_NO_WP) \(-?\d\) on (\d+) sockets? in \d+ us")


def run(coroutine: Coroutine[object, object, None]) -> None:
    asyncio.run(coroutine)


def batches_seen(helper: Helper) -> list[tuple[str, int]]:
    """(command, count) for every message the helper served, from its --debug lines."""
    return [(m[1], int(m[2])) for m in map(DEBUG_LINE.match, helper.stderr.splitlines()) if m]


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll `condition` in the event loop: the server's own waits go on meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


def wait_connected(helper: Helper, timeout: float = 10.0) -> None:
    """Wait for the helper's "connected to" line: its connect() has returned."""
    stream = helper.proc.stderr
    assert stream is not None
    assert select.select([stream], [], [], timeout)[0], "the helper did not connect"
    line = stream.readline().decode()
    assert " connected to " in line, line


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "s.repair"


@pytest.fixture
def helpers() -> Iterator[list[Helper]]:
    started: list[Helper] = []
    yield started
    for h in started:
        h.kill()


def start(helpers: list[Helper], *args: str, prefix: Sequence[str] = ()) -> Helper:
    h = Helper(*args, prefix=prefix)
    helpers.append(h)
    return h


# -- switching ---------------------------------------------------------------


@pytest.mark.parametrize(("n", "sizes"), [(1, [1]), (253, [253]), (600, [253, 253, 94])])
def test_switch_in_batches(path: Path, pairs: TcpPairs, helpers: list[Helper], n: int, sizes: list[int]) -> None:
    socks = pairs.make(n)

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            start(helpers, "--debug", str(path))
            await server.accept(timeout=10)
            await server.switch(socks, ON)
            assert states(socks) == [1] * n
            await server.switch(socks, OFF_NO_WP)
            assert states(socks) == [0] * n

    run(body())
    assert helpers[0].wait() == 0
    assert batches_seen(helpers[0]) == [("ON", k) for k in sizes] + [("OFF_NO_WP", k) for k in sizes]


def test_queue_sends_on_command_change_and_flush(path: Path, pairs: TcpPairs, helpers: list[Helper]) -> None:
    socks = pairs.make(4)

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            start(helpers, "--debug", str(path))
            await server.accept(timeout=10)
            for s in socks[:3]:
                await server.queue(s, ON)
            assert (server.queued, states(socks)) == (3, [0, 0, 0, 0])
            await server.queue(socks[3], OFF)  # the command changes: the three go out first
            assert (server.queued, states(socks)) == (1, [1, 1, 1, 0])
            await server.flush()
            assert server.queued == 0

    run(body())
    assert helpers[0].wait() == 0
    assert batches_seen(helpers[0]) == [("ON", 3), ("OFF", 1)]


def test_concurrent_tasks_take_turns(path: Path, pairs: TcpPairs, helpers: list[Helper]) -> None:
    socks = pairs.make(300)

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            start(helpers, "--debug", str(path))
            await server.accept(timeout=10)
            await asyncio.gather(server.switch(socks[:150], ON), server.switch(socks[150:], ON))
            assert states(socks) == [1] * 300

    run(body())
    assert helpers[0].wait() == 0
    assert sorted(batches_seen(helpers[0])) == [("ON", 150), ("ON", 150)]


def test_repair_turns_off_on_exception(path: Path, pairs: TcpPairs, helpers: list[Helper]) -> None:
    socks = pairs.make(5)

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            start(helpers, str(path))
            await server.accept(timeout=10)
            seen: list[int] = []

            async def fail_inside() -> None:
                async with server.repair(socks, off=OFF_NO_WP) as items:
                    assert items == socks
                    seen.extend(states(socks))
                    raise ValueError("in the block")

            with pytest.raises(ValueError, match="in the block"):
                await fail_inside()
            assert seen == [1] * 5
            assert states(socks) == [0] * 5

    run(body())


def test_repair_undoes_a_half_done_switch(path: Path, pairs: TcpPairs, helpers: list[Helper]) -> None:
    """The second batch holds a UDP socket: the helper refuses it and exits; the first batch
    (253 sockets, switched on) is switched off again through a new helper."""
    socks = pairs.make(253)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def second_helper_after_the_first_exits() -> None:
        await asyncio.to_thread(helpers[0].wait)
        start(helpers, str(path))

    async def body() -> None:
        async with AsyncRepairServer(path, attach_timeout=10) as server:
            start(helpers, str(path))  # once the socket exists: the helper does not wait for one
            await server.accept(timeout=10)
            replacement = asyncio.create_task(second_helper_after_the_first_exits())
            with pytest.raises(HelperGoneError) as caught:
                async with server.repair([*socks, udp]):
                    pytest.fail("the block must not run")
            await replacement
            assert caught.value.confirmed == 253
            assert caught.value.uncertain == (udp.fileno(),)
            assert states(socks) == [0] * 253

    try:
        run(body())
    finally:
        udp.close()
    first = helpers[0]
    assert first.wait() == 1
    assert "EOPNOTSUPP" in first.stderr
    assert helpers[1].wait() == 0


def test_repair_reports_sockets_left_on(path: Path, pairs: TcpPairs, helpers: list[Helper]) -> None:
    socks = pairs.make(253)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            start(helpers, str(path))
            await server.accept(timeout=10)
            with pytest.raises(
                HelperGoneError, match="253 sockets switched on before it are still in repair mode"
            ) as caught:
                async with server.repair([*socks, udp]):
                    pass
            assert (caught.value.confirmed, caught.value.uncertain) == (253, (udp.fileno(),))
            assert caught.value.helper is not None  # the helper that refused, kept on the error that wraps its own

    try:
        run(body())
    finally:
        udp.close()
    assert states(socks) == [1] * 253


# -- helpers: one, none, two, gone, wrong -------------------------------------


def test_accept_reports_the_helper(path: Path, helpers: list[Helper], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="passt_repair.aio")

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            assert not server.attached
            helper = start(helpers, str(path))
            info = await server.accept(timeout=10)
            assert (info.pid, info.uid, server.attached, server.helper) == (helper.pid, 0, True, info)
            assert await server.accept(timeout=0) is info  # attached already

    run(body())
    assert f"helper attached: pid {helpers[0].pid}, uid 0" in caplog.text
    assert helpers[0].wait() == 0


def test_no_helper(path: Path, pairs: TcpPairs) -> None:
    sock = pairs.make(1)[0]

    async def body() -> None:
        async with AsyncRepairServer(path, attach_timeout=0.05) as server:
            with pytest.raises(NoHelperError, match=r"within 0\.1 s"):
                await server.accept(timeout=0.1)
            with pytest.raises(NoHelperError, match=f"passt-repair {path}"):
                await server.switch([sock], ON)
            assert not server.attached

    run(body())
    assert states([sock]) == [0]


def test_second_helper_is_rejected(
    path: Path, pairs: TcpPairs, helpers: list[Helper], caplog: pytest.LogCaptureFixture
) -> None:
    sock = pairs.make(1)[0]

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            first = start(helpers, str(path))
            await server.accept(timeout=10)
            second = start(helpers, str(path))
            await asyncio.to_thread(wait_connected, second)
            await server.switch([sock], ON)  # takes the second one off the queue and closes it
            assert await asyncio.to_thread(second.wait) == 0
            assert server.helper is not None
            assert server.helper.pid == first.pid
            await server.switch([sock], OFF)

    run(body())
    assert f"rejected a second helper: pid {helpers[1].pid}" in caplog.text
    assert states([sock]) == [0]
    assert helpers[0].wait() == 0


def test_helper_refuses(path: Path, pairs: TcpPairs, helpers: list[Helper]) -> None:
    socks = pairs.make(3)
    listening = socket.create_server(("127.0.0.1", 0))

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            start(helpers, str(path))
            await server.accept(timeout=10)
            with pytest.raises(HelperGoneError, match="refused the request"):
                await server.switch([*socks, listening], ON)
            assert not server.attached

    try:
        run(body())
    finally:
        listening.close()
    assert states(socks) == [0, 0, 0]
    assert helpers[0].wait() == 1


def test_cancelled_while_waiting_for_the_reply(path: Path, pairs: TcpPairs) -> None:
    sock = pairs.make(1)[0]

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            fake = FakeHelper(path)
            await server.accept(timeout=10)
            task = asyncio.create_task(server.switch([sock], ON))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not server.attached  # a reply may still come: the connection is dropped
            fake.sock.settimeout(10)
            assert fake.sock.recv(1) == ON.byte
            assert fake.sock.recv(1) == b""
            fake.sock.close()

    run(body())


@pytest.mark.parametrize("stop", ["close", "detach"])
def test_closing_ends_a_pending_wait(path: Path, pairs: TcpPairs, stop: str) -> None:
    """close() while a task waits for a helper, detach() while one waits for a reply: both end at once."""
    sock = pairs.make(1)[0]

    async def body() -> None:
        server = AsyncRepairServer(path)
        fake = FakeHelper(path) if stop == "detach" else None
        waiting: Callable[[], Coroutine[object, object, object]] = (
            (lambda: server.switch([sock], ON)) if fake else (lambda: server.accept(timeout=None))
        )
        if fake:
            await server.accept(timeout=10)
        task = asyncio.create_task(waiting())
        await asyncio.sleep(0.05)
        getattr(server, stop)()
        with pytest.raises(HelperGoneError if fake else NoHelperError, match="closed while waiting"):
            await asyncio.wait_for(task, 10)
        server.close()
        if fake:
            fake.sock.close()

    run(body())
    assert not path.exists()


# -- faults: a helper killed, one that hangs, lies or speaks unasked, helpers racing ----------


@pytest.mark.skipif(not have("strace"), reason="needs strace")
def test_helper_killed_in_the_middle_of_a_batch(path: Path, pairs: TcpPairs, helpers: list[Helper]) -> None:
    """SIGKILL (from a task of the same loop) while the helper works through the second batch: the switch
    raises at once, names the batch in doubt, its sockets are found half switched, a fresh helper finishes."""
    socks = pairs.make(300)
    fds = [s.fileno() for s in socks]
    # Every setsockopt of the second batch takes 50 ms, so the kill lands in its middle.
    slow_second_batch = [
        "strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=setsockopt",
        "-e", f"inject=setsockopt:delay_enter=50000:when={SCM_MAX_FD + 1}+",
    ]  # fmt: skip
    reply_timeout = 30.0

    async def body() -> None:
        async with AsyncRepairServer(path, reply_timeout=reply_timeout) as server:
            first = start(helpers, str(path), prefix=slow_second_batch)
            info = await server.accept(timeout=20)

            async def kill_halfway() -> None:
                await until(lambda: sum(states(socks[SCM_MAX_FD:])) >= 5, "the second batch is under way")
                os.kill(info.pid, signal.SIGKILL)

            killer = asyncio.create_task(kill_halfway())
            started = time.monotonic()
            with pytest.raises(HelperGoneError, match="may or may not be switched") as raised:
                await server.switch(socks, ON)
            elapsed = time.monotonic() - started
            await killer
            error = raised.value
            assert elapsed < reply_timeout  # the closed connection is seen at once, not after the timeout
            assert not server.attached
            assert (error.confirmed, error.uncertain) == (SCM_MAX_FD, tuple(fds[SCM_MAX_FD:]))
            assert error.helper is not None
            assert error.helper.pid == info.pid
            assert await asyncio.to_thread(first.wait) != 0  # strace reports the helper's death by signal
            # What the caller learns from repair_state: the confirmed batch is on, the one in doubt is half done.
            assert states(socks[:SCM_MAX_FD]) == [1] * SCM_MAX_FD
            in_doubt = [repair_state(fd) for fd in error.uncertain]
            assert 5 <= sum(in_doubt) < len(in_doubt), in_doubt
            # A fresh helper attaches and finishes the job.
            second = start(helpers, str(path))
            await server.accept(timeout=20)
            await server.switch(error.uncertain, ON)
            assert states(socks) == [1] * 300
            await server.switch(socks, OFF)
            assert states(socks) == [0] * 300
            server.detach()
            assert await asyncio.to_thread(second.wait) == 0

    run(body())


def test_helper_killed_while_idle_is_replaced(
    path: Path, pairs: TcpPairs, helpers: list[Helper], caplog: pytest.LogCaptureFixture
) -> None:
    """A helper that dies between requests loses nothing: the next switch takes a new helper, or says none came."""
    caplog.set_level(logging.INFO, logger="passt_repair.aio")
    socks = pairs.make(3)

    async def body() -> None:
        async with AsyncRepairServer(path, reply_timeout=20) as server:
            first = start(helpers, str(path))
            info = await server.accept(timeout=20)
            await server.switch(socks[:1], ON)
            os.kill(info.pid, signal.SIGKILL)
            await asyncio.to_thread(first.wait)
            second = start(helpers, str(path))
            await until(lambda: syscall(second.pid) == RECVMSG, "the new helper is connected")
            server.attach_timeout = 20
            await server.switch(socks[1:2], ON)  # goes to the new helper
            assert server.helper is not None
            assert server.helper.pid == second.pid
            assert f"helper pid {info.pid} closed the connection while idle" in caplog.text
            assert states(socks) == [1, 1, 0]
            os.kill(second.pid, signal.SIGKILL)
            await asyncio.to_thread(second.wait)
            server.attach_timeout = 0.05
            with pytest.raises(NoHelperError, match="no passt-repair helper connected") as raised:
                await server.switch(socks[2:], ON)
            assert raised.value.uncertain == ()
            assert states(socks) == [1, 1, 0]

    run(body())


def test_helper_that_never_replies(path: Path, pairs: TcpPairs) -> None:
    sock = pairs.make(1)[0]

    async def body() -> None:
        async with AsyncRepairServer(path, reply_timeout=0.5) as server:
            fake = FakeHelper(path)
            await server.accept(timeout=5)
            reading = asyncio.create_task(asyncio.to_thread(fake.request))
            with pytest.raises(RepairTimeoutError, match=r"no reply from the helper within 0\.5 s") as raised:
                await server.switch([sock], ON)
            payload, fds = await reading
            assert (payload, len(fds)) == (ON.byte, 1)
            assert isinstance(raised.value, TimeoutError)
            assert raised.value.uncertain == (sock.fileno(),)
            assert f"pid {os.getpid()} may still be switching them" in str(raised.value)  # the fake helper is us
            assert not server.attached
            assert fake.closed_by_server()
            fake.sock.close()

    run(body())


@pytest.mark.parametrize("reply", [b"\x00", b"\x02", b"\xff", b"\x01\x01"], ids=["off", "two", "minus-one", "twice"])
def test_helper_that_replies_a_wrong_byte(path: Path, pairs: TcpPairs, reply: bytes) -> None:
    sock = pairs.make(1)[0]

    async def body() -> None:
        async with AsyncRepairServer(path, reply_timeout=5) as server:
            fake = FakeHelper(path)
            await server.accept(timeout=5)
            answering = asyncio.create_task(asyncio.to_thread(fake.answer, reply))
            with pytest.raises(WrongReplyError, match=re.escape(f"helper replied {reply!r} to command ON")) as raised:
                await server.switch([sock], ON)
            await answering
            assert raised.value.uncertain == (sock.fileno(),)
            assert not server.attached
            assert fake.closed_by_server()
            fake.sock.close()

    run(body())


def test_helper_that_speaks_unasked(path: Path, pairs: TcpPairs) -> None:
    """A correct reply followed by a stray byte: the stray byte must not pass for the next request's reply."""
    socks = pairs.make(2)

    async def body() -> None:
        async with AsyncRepairServer(path, reply_timeout=5) as server:
            fake = FakeHelper(path)
            await server.accept(timeout=5)
            answering = asyncio.create_task(asyncio.to_thread(fake.answer, ON.byte))
            await server.switch(socks[:1], ON)
            await answering
            fake.sock.send(ON.byte)  # a UNIX socket queues it at the server before send() returns
            with pytest.raises(WrongReplyError, match="without a request; nothing was sent") as raised:
                await server.switch(socks[1:], ON)
            assert (raised.value.uncertain, raised.value.confirmed) == ((), 0)
            assert not server.attached
            assert fake.closed_by_server()  # and the request was never sent to it
            fake.sock.close()

    run(body())
    assert states(socks) == [0, 0]  # the fake switched nothing; the second request never left


def test_a_send_that_fails_changed_nothing(path: Path, pairs: TcpPairs) -> None:
    """sendmsg() refuses a descriptor that is not open (EBADF): the message never left, nothing is in doubt."""
    socks = pairs.make(1)
    closed = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # no descriptor can have this number

    async def body() -> None:
        async with AsyncRepairServer(path, reply_timeout=5) as server:
            fake = FakeHelper(path)
            info = await server.accept(timeout=5)
            with pytest.raises(HelperGoneError, match="sending to the helper failed: Bad file descriptor") as raised:
                await server.switch([socks[0], closed], ON)
            assert str(raised.value).endswith("; nothing was sent, no socket changed")
            assert (raised.value.uncertain, raised.value.confirmed, raised.value.helper) == ((), 0, info)
            assert not server.attached
            assert fake.closed_by_server()
            fake.sock.close()

    run(body())
    assert states(socks) == [0]


@pytest.mark.parametrize("round_", range(3))
def test_two_helpers_racing(
    path: Path, pairs: TcpPairs, helpers: list[Helper], caplog: pytest.LogCaptureFixture, round_: int
) -> None:
    """Both connect before the server accepts: one is used, the other is closed and logged."""
    caplog.set_level(logging.INFO, logger="passt_repair.aio")
    socks = pairs.make(2)

    async def body() -> None:
        async with AsyncRepairServer(path, reply_timeout=20) as server:
            racers = [start(helpers, "--debug", str(path)) for _ in range(2)]
            # The backlog holds one: the first to connect waits for a request, the other in connect().
            await until(lambda: sorted(syscall(h.pid) for h in racers) == [CONNECT, RECVMSG], "both have connected")
            info = await server.accept(timeout=20)
            used = next(h for h in racers if h.pid == info.pid)
            other = next(h for h in racers if h is not used)
            # accept() let the other one's connect() finish, and closes it if it is there by then;
            # if not, the next switch does, before any request goes out.
            await until(lambda: syscall(other.pid) == RECVMSG or other.proc.poll() is not None, "the other connects")
            await server.switch(socks, ON)
            assert await asyncio.to_thread(other.wait) == 0
            assert error_lines(other.stderr) == []
            assert f"rejected a second helper: pid {other.pid}" in caplog.text
            assert states(socks) == [1, 1]
            server.detach()
            assert await asyncio.to_thread(used.wait) == 0
            assert (batches_seen(used), batches_seen(other)) == ([("ON", 2)], [])

    run(body())


# -- the socket file -----------------------------------------------------------


def test_socket_file(path: Path) -> None:
    async def body() -> None:
        async with AsyncRepairServer(path, mode=0o660):
            st = path.stat()
            assert (stat.S_ISSOCK(st.st_mode), stat.S_IMODE(st.st_mode)) == (True, 0o660)
        assert not path.exists()

    run(body())


def test_stale_socket_is_replaced(path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens

    async def body() -> None:
        async with AsyncRepairServer(path):
            probe = socket.socket(socket.AF_UNIX)
            probe.connect(str(path))
            probe.close()

    run(body())


def test_refuses_to_clobber(path: Path) -> None:
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        AsyncRepairServer(path)
    assert path.read_text() == "not a socket"
    path.unlink()
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(OSError, match="another server") as caught:
            AsyncRepairServer(path)
        assert caught.value.errno == errno.EADDRINUSE
    finally:
        live.close()


def test_socket_file_removed(path: Path, pairs: TcpPairs, helpers: list[Helper]) -> None:
    socks = pairs.make(2)

    async def body() -> None:
        async with AsyncRepairServer(path, reply_timeout=20) as server:
            attached = start(helpers, str(path))
            await server.accept(timeout=20)
            path.unlink()
            await server.switch(socks[:1], ON)  # the attached helper does not need the file
            server.detach()
            assert await asyncio.to_thread(attached.wait) == 0
            with pytest.raises(NoHelperError, match=r"was removed: no helper can connect; call listen\(\)"):
                await server.switch(socks[1:], ON)
            with pytest.raises(NoHelperError, match="was removed"):
                await server.accept(timeout=5)
            server.listen()
            start(helpers, str(path))
            await server.accept(timeout=20)
            await server.switch(socks[1:], ON)
            assert states(socks) == [1, 1]

    run(body())
    assert helpers[1].wait() == 0
    assert not path.exists()


@pytest.mark.parametrize("replacement", ["stale socket", "regular file", "live server"])
def test_socket_file_replaced(path: Path, pairs: TcpPairs, helpers: list[Helper], replacement: str) -> None:
    """Someone else's file at the path: the server says so, recreates its socket where that is safe,
    and never removes the other file."""
    sock = pairs.make(1)[0]
    other = socket.socket(socket.AF_UNIX)

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            path.unlink()
            if replacement == "regular file":
                path.write_text("someone else's")
            else:
                other.bind(str(path))
                if replacement == "live server":
                    other.listen(1)
                else:
                    other.close()
            with pytest.raises(NoHelperError, match="was replaced by another file"):
                await server.switch([sock], ON)
            if replacement == "stale socket":
                server.listen()  # nobody listens there: taken over
                helper = start(helpers, str(path))
                await server.accept(timeout=20)
                await server.switch([sock], ON)
                assert repair_state(sock)
                server.detach()
                assert await asyncio.to_thread(helper.wait) == 0
            else:
                with pytest.raises(OSError, match=r"not a socket; refusing|another server is listening"):
                    server.listen()

    try:
        run(body())
    finally:
        other.close()
    assert path.exists() == (replacement != "stale socket")  # close() removed ours only
    if replacement == "regular file":
        assert path.read_text() == "someone else's"
