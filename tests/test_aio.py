"""AsyncRepairServer against the installed helper (and a fake one where the helper cannot misbehave).

Every state is read back from the kernel with getsockopt(TCP_REPAIR); every
batch the helper received is read from its --debug log.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import select
import signal
import socket
import stat
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path

import pytest

from passt_repair import (
    AsyncRepairServer,
    Command,
    HelperGoneError,
    NoHelperError,
    RepairTimeoutError,
    WrongReplyError,
)
from support import Helper, TcpPairs, states

ON, OFF, OFF_NO_WP = Command.ON, Command.OFF, Command.OFF_NO_WP
DEBUG_LINE = re.compile(r"passt-repair: (ON|OFF|OFF_NO_WP) \(-?\d\) on (\d+) sockets in \d+ us")


def run(coroutine: Coroutine[object, object, None]) -> None:
    asyncio.run(coroutine)


def batches_seen(helper: Helper) -> list[tuple[str, int]]:
    """(command, count) for every message the helper served, from its --debug lines."""
    return [(m[1], int(m[2])) for m in map(DEBUG_LINE.match, helper.stderr.splitlines()) if m]


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


def start(helpers: list[Helper], *args: str) -> Helper:
    h = Helper(*args)
    helpers.append(h)
    return h


class FakeHelper:
    """A helper that connects and answers whatever the test says (or nothing)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))

    def answer(self, reply: bytes) -> None:
        self.sock.settimeout(10)
        _, ancillary, _, _ = self.sock.recvmsg(1, socket.CMSG_SPACE(253 * 4))
        for _, _, data in ancillary:
            for i in range(0, len(data) - len(data) % 4, 4):
                os.close(int.from_bytes(data[i : i + 4], "little"))
        self.sock.send(reply)


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
    first = start(helpers, str(path))

    async def second_helper_after_the_first_exits() -> None:
        await asyncio.to_thread(first.wait)
        start(helpers, str(path))

    async def body() -> None:
        async with AsyncRepairServer(path, attach_timeout=10) as server:
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
            with pytest.raises(HelperGoneError, match="253 sockets switched on before it are still in repair mode"):
                async with server.repair([*socks, udp]):
                    pass

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


def test_helper_gone_then_a_new_one(path: Path, pairs: TcpPairs, helpers: list[Helper]) -> None:
    socks = pairs.make(3)

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            first = start(helpers, str(path))
            await server.accept(timeout=10)
            first.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.proc.wait)
            with pytest.raises(HelperGoneError) as caught:
                await server.switch(socks, ON)
            assert caught.value.uncertain == tuple(s.fileno() for s in socks)
            assert not server.attached
            start(helpers, str(path))
            await server.accept(timeout=10)
            await server.switch(socks, ON)
            assert states(socks) == [1, 1, 1]

    run(body())


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


def test_wrong_reply(path: Path, pairs: TcpPairs) -> None:
    sock = pairs.make(1)[0]

    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            fake = FakeHelper(path)
            await server.accept(timeout=10)
            answering = asyncio.create_task(asyncio.to_thread(fake.answer, b"\x00"))
            with pytest.raises(WrongReplyError, match="replied b'\\\\x00' to command ON"):
                await server.switch([sock], ON)
            await answering
            assert not server.attached
            assert fake.sock.recv(1) == b""  # the server closed the connection
            fake.sock.close()

    run(body())


def test_reply_timeout(path: Path, pairs: TcpPairs) -> None:
    sock = pairs.make(1)[0]

    async def body() -> None:
        async with AsyncRepairServer(path, reply_timeout=0.2) as server:
            fake = FakeHelper(path)
            await server.accept(timeout=10)
            with pytest.raises(RepairTimeoutError, match=r"within 0\.2 s") as caught:
                await server.switch([sock], ON)
            assert isinstance(caught.value, TimeoutError)
            assert caught.value.uncertain == (sock.fileno(),)
            assert not server.attached
            fake.sock.close()

    run(body())


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


def test_removed_socket_file_is_reported(path: Path) -> None:
    async def body() -> None:
        async with AsyncRepairServer(path) as server:
            path.unlink()
            with pytest.raises(NoHelperError, match="removed or replaced"):
                await server.accept(timeout=1)
            server.listen()
            assert path.exists()

    run(body())
