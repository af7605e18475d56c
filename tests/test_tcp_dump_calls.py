# SPDX-License-Identifier: GPL-2.0-or-later
"""The system calls the dump leaves out, on real loopback sockets: each one left out is shown harmless here.

`checkpoint` reads TCP_INFO once, before the switch, and trusts it after
the switch only when poll() shows nothing that could have changed the state
(docs/performance.md, "System calls per connection"); SO_PEEK_OFF is read
only when the receive queue has bytes, as the send queue's peek ignores it.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator

import pytest

from passt_repair.protocol import Command
from passt_repair.server import SocketLike
from passt_repair.tcp import DirectSwitcher, TcpState, checkpoint, thaw

SOL_TCP = socket.IPPROTO_TCP
SO_PEEK_OFF = 42
POLLRDHUP = 0x2000


class Pair:
    """A loopback connection: `server` (the one dumped) and `peer`."""

    def __init__(self) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            self.peer = socket.create_connection(listener.getsockname())
            self.server, _ = listener.accept()

    def close(self) -> None:
        self.peer.close()
        self.server.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    yield made
    made.close()


def _until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _outq(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), 0x5411, bytes(4)))[0])


class ChangeThenSwitch:
    """A switcher that lets `change` happen to the sockets after checkpoint read TCP_INFO, then switches."""

    def __init__(self, change: Callable[[], None]) -> None:
        self.change = change
        self.direct = DirectSwitcher()

    def switch(self, sockets: Iterable[SocketLike], command: Command) -> None:
        items = list(sockets)
        if command == Command.ON:
            self.change()
        self.direct.switch(items, command)


def test_a_fin_between_the_first_read_and_the_switch_is_seen(pair: Pair) -> None:
    """The peer's FIN lands after the TCP_INFO read before the switch: the record says CLOSE_WAIT, not ESTABLISHED."""
    pair.peer.sendall(b"last words")

    def fin() -> None:
        pair.peer.shutdown(socket.SHUT_WR)
        poller = select.poll()
        poller.register(pair.server, POLLRDHUP)
        _until(lambda: poller.poll(0), "the FIN to arrive")

    switcher = ChangeThenSwitch(fin)
    frozen = checkpoint([pair.server], switcher)
    try:
        assert frozen.failures == []
        state = frozen.states[0]
        assert state.state is TcpState.CLOSE_WAIT
        assert state.rcv_shutdown
        assert bytes(state.received) == b"last words"
    finally:
        thaw([pair.server], switcher)
    assert pair.server.recv(64) == b"last words"
    assert pair.server.recv(64) == b""


def test_a_reset_between_the_first_read_and_the_switch_is_a_failure(pair: Pair) -> None:
    """A reset after the first read leaves a closed socket: reported as such, never dumped as ESTABLISHED."""

    def reset() -> None:
        pair.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pair.peer.close()
        _until(lambda: pair.server.getsockopt(SOL_TCP, 11, 1)[0] == 7, "the reset to arrive")  # TCP_CLOSE

    frozen = checkpoint([pair.server], ChangeThenSwitch(reset))
    assert frozen.states == []
    assert [f.index for f in frozen.failures] == [0]
    assert "CLOSE" in frozen.failures[0].reason


def test_peek_offset_is_left_alone_when_nothing_waits_to_be_read(pair: Pair) -> None:
    """With the receive queue empty SO_PEEK_OFF is not touched, and the send queue's peek ignores it."""
    pair.server.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 3)
    # The peer stops reading after a while; what it has not acknowledged stays in the send queue.
    pair.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pair.server.setblocking(False)
    sent = b""
    try:
        while True:
            sent += b"x" * pair.server.send(b"x" * 65536)
    except BlockingIOError:
        pass
    pair.server.setblocking(True)
    _until(lambda: _outq(pair.server) > 0, "unacknowledged bytes")
    switcher = DirectSwitcher()
    frozen = checkpoint([pair.server], switcher)
    try:
        assert frozen.failures == []
        state = frozen.states[0]
        assert len(state.sent) + len(state.unsent) == _outq(pair.server) > 3
        assert state.received == b""
    finally:
        thaw([pair.server], switcher)
    assert pair.server.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF) == 3
