# SPDX-License-Identifier: GPL-2.0-or-later
"""Checkpoint and restore on real sockets over loopback, each test in a network namespace of its own.

Each test moves live connections into new sockets through the installed
helper (running with CAP_NET_ADMIN alone) or directly (the tests run as
root), and reads the outcome back from the kernel: TCP_INFO, the options,
the bytes that arrive. A move on one host has a gap: the frozen socket is
closed before the new one exists (both cannot hold the 4-tuple), and a
segment from the peer in between (its delayed ACK, 40 ms after the last
data) meets no socket and draws a reset. So loopback is cut off from the
dump until the restore (`move`), as the order of docs/migration.md does
with the service address. Moves between hosts are in
test_migration_netns.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import Loopback
from passt_repair.protocol import Command
from passt_repair.server import RepairError, RepairServer, repair_state
from passt_repair.tcp import (
    ConnectionState,
    DirectSwitcher,
    DumpError,
    RecordError,
    Restored,
    StepError,
    Switcher,
    TcpState,
    checkpoint,
    decode,
    dump,
    encode,
    restore,
    resume,
    stream_buffer,
    thaw,
)
from support import SETPRIV_NET_ADMIN_ONLY, Helper

SOL_TCP = socket.IPPROTO_TCP
TCP_INFO = 11


@pytest.fixture(autouse=True)
def lo() -> Iterator[Loopback]:
    """This test's own namespace: its sockets live there, and `move` cuts its loopback off for the gap."""
    with Loopback() as loopback:
        yield loopback


@contextlib.contextmanager
def helper_server(tmp_path: Path) -> Iterator[tuple[RepairServer, Helper]]:
    """A RepairServer with the installed helper attached (CAP_NET_ADMIN only)."""
    with RepairServer(tmp_path / "t.repair", reply_timeout=10) as server:
        helper = Helper(str(tmp_path / "t.repair"), prefix=SETPRIV_NET_ADMIN_ONLY)
        try:
            server.accept(timeout=10)
            yield server, helper
        finally:
            server.close()
            helper.wait(timeout=10)
            helper.kill()


@pytest.fixture(params=["helper", "direct"])
def switcher(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Switcher]:
    if request.param == "direct":
        yield DirectSwitcher()
        return
    with helper_server(tmp_path) as (server, _):
        yield server


HOSTS = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


class Pair:
    """A loopback connection: `server` (accepted, the one that moves) and `peer`."""

    def __init__(self, family: socket.AddressFamily = socket.AF_INET, peer_rcvbuf: int | None = None) -> None:
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind((HOSTS[family], 0))
            listener.listen(1)
            self.peer = socket.socket(family, socket.SOCK_STREAM)
            if peer_rcvbuf:
                self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
            self.peer.connect(listener.getsockname()[:2])
            self.server, _ = listener.accept()
        self.peer.settimeout(10)

    def close(self) -> None:
        self.peer.close()
        self.server.close()


@pytest.fixture
def pairs() -> Iterator[list[Pair]]:
    made: list[Pair] = []
    yield made
    for p in made:
        p.close()


def tcp_facts(sock: socket.socket) -> tuple[int, int, int]:
    """What must survive a move: tcpi_options (SACK, timestamps, window scaling), both window scales."""
    info = sock.getsockopt(SOL_TCP, TCP_INFO, 8)
    return info[5], info[6] & 0xF, info[6] >> 4


def state_of(sock: socket.socket) -> TcpState:
    return TcpState(sock.getsockopt(SOL_TCP, TCP_INFO, 1)[0])


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"end of file after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def move(socks: list[socket.socket], switcher: Switcher, lo: Loopback) -> Restored:
    """Cut off, checkpoint, encode, close the old sockets, decode, restore, reattach, resume: the whole move."""
    lo.cut()
    frozen = checkpoint(socks, switcher)
    assert frozen.failures == []
    data = encode(frozen.states)
    assert frozen.data == data, "the stream made while dumping is the encoding of the states"
    for s in socks:
        s.close()
    restored = restore(decode(data), switcher)
    lo.attach()
    resume(restored, switcher)
    assert restored.failures == []
    return restored


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# -- what moves --------------------------------------------------------------


OPTIONS = [
    ("nodelay", SOL_TCP, socket.TCP_NODELAY, 1),
    ("keepalive", socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ("keepidle", SOL_TCP, socket.TCP_KEEPIDLE, 31),
    ("keepintvl", SOL_TCP, socket.TCP_KEEPINTVL, 7),
    ("keepcnt", SOL_TCP, socket.TCP_KEEPCNT, 4),
    ("user_timeout", SOL_TCP, 18, 12345),
    ("sndbuf", socket.SOL_SOCKET, socket.SO_SNDBUF, 300000),
    ("rcvbuf", socket.SOL_SOCKET, socket.SO_RCVBUF, 200000),
    ("mark", socket.SOL_SOCKET, 36, 0xC0FFEE),
    ("notsent_lowat", SOL_TCP, 25, 131072),  # TCP_NOTSENT_LOWAT
]


def read_options(sock: socket.socket) -> dict[str, int | bytes]:
    """The user options as the kernel reports them (a second reading, independent of `dump`)."""
    values: dict[str, int | bytes] = {name: sock.getsockopt(level, opt) for name, level, opt, _ in OPTIONS}
    values["congestion"] = sock.getsockopt(SOL_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")
    tos = (socket.IPPROTO_IPV6, 67) if sock.family == socket.AF_INET6 else (socket.IPPROTO_IP, socket.IP_TOS)
    values["tos"] = sock.getsockopt(*tos)
    values["buf_lock"] = sock.getsockopt(socket.SOL_SOCKET, 72)
    return values


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_move_keeps_queues_options_and_tcp_facts(
    switcher: Switcher, pairs: list[Pair], lo: Loopback, family: socket.AddressFamily
) -> None:
    """Unread received bytes and unsent bytes (the peer's window is full) move; so do the user's options."""
    pair = Pair(family, peer_rcvbuf=4096)
    pairs.append(pair)
    s, peer = pair.server, pair.peer
    for _, level, opt, value in OPTIONS:
        s.setsockopt(level, opt, value)
    s.setsockopt(SOL_TCP, socket.TCP_CONGESTION, b"reno")
    tos = (socket.IPPROTO_IPV6, 67) if family == socket.AF_INET6 else (socket.IPPROTO_IP, socket.IP_TOS)
    s.setsockopt(*tos, 0x28)
    options_before = read_options(s)
    facts_before = tcp_facts(s)

    incoming = os.urandom(30000)
    peer.sendall(incoming)
    outgoing = os.urandom(400000)
    s.setblocking(False)
    written = 0
    with contextlib.suppress(BlockingIOError):
        while written < len(outgoing):
            written += s.send(outgoing[written:])
    s.settimeout(5)  # timeout mode: the dump must not poll the repair send queue (docs/migration.md)
    deadline = time.monotonic() + 5
    while _inq(s) < len(incoming):
        assert time.monotonic() < deadline
        time.sleep(0.01)

    lo.cut()
    frozen = checkpoint([s], switcher)
    assert frozen.failures == []
    (st,) = frozen.states
    assert st.state == TcpState.ESTABLISHED
    assert st.received == incoming
    assert st.unsent, "the peer's full window leaves bytes unsent"
    assert outgoing[:written].endswith(bytes(st.sent) + bytes(st.unsent))
    assert st.options.nodelay
    assert (st.options.keepidle, st.options.keepintvl, st.options.keepcnt) == (31, 7, 4)
    assert st.options.congestion == "reno"
    assert st.options.sndbuf == options_before["sndbuf"]
    assert st.options.rcvbuf == options_before["rcvbuf"]
    assert (st.options.tos, st.options.mark) == (0x28, 0xC0FFEE)
    assert repair_state(s), "checkpoint leaves the socket frozen in repair mode"
    # The dump builds records without their __init__: every field must be there, and equal a constructed copy.
    assert dataclasses.replace(st, window=dataclasses.replace(st.window), options=dataclasses.replace(st.options)) == st
    assert set(vars(st)) - {"_checked"} == {f.name for f in dataclasses.fields(ConnectionState)}

    data = encode(frozen.states)
    s.close()
    restored = restore(decode(data), switcher)
    assert restored.failures == []
    new = restored.sockets[0]
    assert new is not None
    assert repair_state(new), "restore leaves the new socket in repair mode until resume"
    assert new.getsockopt(SOL_TCP, socket.TCP_MAXSEG) == st.mss, "in repair mode TCP_MAXSEG reads the MSS clamp"
    lo.attach()
    resume(restored, switcher)
    assert restored.failures == []
    assert not repair_state(new)

    assert read_options(new) == options_before
    assert tcp_facts(new) == facts_before
    new.settimeout(10)
    assert recv_exactly(new, len(incoming)) == incoming
    in_flight = written - len(st.sent) - len(st.unsent)
    assert recv_exactly(peer, written) == outgoing[:written], f"{in_flight} bytes were past the socket"
    new.sendall(b"after the move")
    assert recv_exactly(peer, 14) == b"after the move"
    peer.sendall(b"and back")
    assert recv_exactly(new, 8) == b"and back"
    new.close()
    assert peer.recv(1) == b""


def _inq(sock: socket.socket) -> int:
    import fcntl

    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), 0x541B, b"\0\0\0\0"))[0])


def _shift(state: ConnectionState, snd: int, rcv: int, timestamp: int) -> ConnectionState:
    """The same connection in sequence spaces moved by `snd` (ours) and `rcv` (the peer's)."""
    w = state.window
    window = dataclasses.replace(
        w, snd_wl1=(w.snd_wl1 + rcv) % 2**32, rcv_wup=(w.rcv_wup + rcv) % 2**32
    )  # snd_wl1 is a sequence number of the peer's
    return dataclasses.replace(
        state,
        snd_seq=(state.snd_seq + snd) % 2**32,
        rcv_seq=(state.rcv_seq + rcv) % 2**32,
        timestamp=timestamp,
        window=window,
    )


def test_sequence_numbers_and_timestamps_above_2_31(pairs: list[Pair]) -> None:
    """Both ends of a connection move, into sequence spaces and timestamps that do not fit a signed int."""
    pair = Pair()
    pairs.append(pair)
    pair.peer.sendall(b"queued for the server")
    pair.server.sendall(b"queued for the peer")
    time.sleep(0.05)
    switcher = DirectSwitcher()
    frozen = checkpoint([pair.server, pair.peer], switcher)
    a, b = frozen.states
    da = (0xFFFFFFF0 - a.snd_seq) % 2**32  # a's next bytes cross 2^32
    db = (0x80000010 - b.snd_seq) % 2**32
    moved = [_shift(a, da, db, 0xFFFFFF00), _shift(b, db, da, 0x80000001)]
    assert moved[0].snd_seq > 2**31
    assert moved[1].snd_seq > 2**31
    pair.server.close()
    pair.peer.close()
    restored = restore(decode(encode(moved)), switcher)
    resume(restored, switcher)
    assert restored.failures == []
    server, peer = (s for s in restored.sockets if s is not None)
    for sock in (server, peer):
        sock.settimeout(10)
    assert recv_exactly(server, 21) == b"queued for the server"
    assert recv_exactly(peer, 19) == b"queued for the peer"
    payload = os.urandom(100000)
    server.sendall(payload)
    assert recv_exactly(peer, len(payload)) == payload
    peer.sendall(payload[::-1])
    assert recv_exactly(server, len(payload)) == payload[::-1]
    again = checkpoint([server], switcher).states[0]
    end_before = moved[0].snd_seq + len(moved[0].sent) + len(moved[0].unsent)
    assert (again.snd_seq + len(again.sent) + len(again.unsent)) % 2**32 == (end_before + len(payload)) % 2**32
    assert again.timestamp is not None
    assert (again.timestamp - 0xFFFFFF00) % 2**32 < 10_000, "the timestamp went on from where it was set (ms)"
    thaw([server], switcher)
    server.close()
    peer.close()


# -- the closing states, on loopback -----------------------------------------


def _fill_window(sock: socket.socket) -> int:
    """Write until the peer's window and our buffer are full; return how many bytes went in."""
    sock.setblocking(False)
    total = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            total += sock.send(bytes(65536))
    sock.setblocking(True)
    return total


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("closing", ["FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK", "CLOSING"])
def test_closing_state_moves_and_finishes(
    switcher: Switcher, pairs: list[Pair], lo: Loopback, closing: str, family: socket.AddressFamily
) -> None:
    """Each closing state moves and the close finishes cleanly on the new socket.

    On loopback a FIN is acknowledged at once, so FIN_WAIT1, LAST_ACK and
    CLOSING are held here by a FIN queued behind bytes the peer's full
    window keeps unsent; test_migration_netns.py has the FIN sent and lost.
    """
    pair = Pair(family, peer_rcvbuf=4096)
    pairs.append(pair)
    s, peer = pair.server, pair.peer
    queued = 0
    if closing in ("CLOSE_WAIT", "LAST_ACK"):
        peer.sendall(b"last words")
        peer.shutdown(socket.SHUT_WR)
    if closing in ("FIN_WAIT1", "LAST_ACK", "CLOSING"):
        queued = _fill_window(s)
    if closing in ("FIN_WAIT1", "FIN_WAIT2", "LAST_ACK", "CLOSING"):
        s.shutdown(socket.SHUT_WR)
    if closing == "CLOSING":
        peer.sendall(b"last words")
        peer.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 5
    while state_of(s).name != closing:
        assert time.monotonic() < deadline, f"{state_of(s).name}, not {closing}"
        time.sleep(0.01)

    restored = move([s], switcher, lo)
    new = restored.sockets[0]
    assert new is not None
    new.settimeout(10)
    if closing != "FIN_WAIT2" and closing != "FIN_WAIT1":
        assert recv_exactly(new, 10) == b"last words"
        assert new.recv(10) == b"", "the peer's FIN moved: end of file after the queued bytes"
    if queued:
        assert recv_exactly(peer, queued) == bytes(queued)
    if closing in ("CLOSE_WAIT",):
        new.sendall(b"reply after the move")
        new.shutdown(socket.SHUT_WR)
        assert recv_exactly(peer, 20) == b"reply after the move"
    if closing in ("FIN_WAIT2",):
        peer.sendall(b"the peer still talks")
        assert recv_exactly(new, 20) == b"the peer still talks"
    assert peer.recv(1) == b"", "the peer reads a clean end of file, no reset"
    if closing in ("FIN_WAIT1", "FIN_WAIT2"):
        peer.sendall(b"bye")
        peer.shutdown(socket.SHUT_WR)
        assert recv_exactly(new, 3) == b"bye"
        assert new.recv(1) == b""
    new.close()
    peer.close()


# -- what fails, and what does not -------------------------------------------


def test_one_failing_connection_does_not_stop_the_others(tmp_path: Path, pairs: list[Pair]) -> None:
    """The middle connection cannot be restored (its old socket holds the 4-tuple): reported, reset; the rest go on."""
    pairs.extend(Pair() for _ in range(3))
    for i, p in enumerate(pairs):
        p.peer.sendall(b"before %d" % i)
    time.sleep(0.05)
    with helper_server(tmp_path) as (server, _):
        frozen = checkpoint([p.server for p in pairs], server)
        pairs[0].server.close()
        pairs[2].server.close()
        before = open_fds()
        restored = restore(frozen.states, server)
        resume(restored, server)
        after = open_fds()
    assert [f.index for f in restored.failures] == [1]
    failure = restored.failures[0]
    assert "connect() in repair mode: EADDRNOTAVAIL" in failure.reason
    assert failure.connection == frozen.states[1].describe()
    assert restored.sockets[1] is None
    assert len(after) - len(before) == 2, "no socket left behind for the failed connection"
    for i in (0, 2):
        new = restored.sockets[i]
        assert new is not None
        new.settimeout(10)
        assert recv_exactly(new, 8) == b"before %d" % i
        new.sendall(b"moved")
        assert recv_exactly(pairs[i].peer, 5) == b"moved"
        new.close()
    # The failed connection's old socket is frozen; once it is gone, the peer's next segment draws a reset.
    pairs[1].server.close()
    pairs[1].peer.sendall(b"anyone?")
    with pytest.raises(ConnectionResetError):
        pairs[1].peer.recv(1)


def test_helper_gone_before_resume(tmp_path: Path, pairs: list[Pair]) -> None:
    """Repair mode cannot be switched off: every connection is reported and closed, none left half-made."""
    pairs.extend(Pair() for _ in range(3))
    with helper_server(tmp_path) as (server, helper):
        frozen = checkpoint([p.server for p in pairs], server)
        for p in pairs:
            p.server.close()
        restored = restore(frozen.states, server)
        assert restored.failures == []
        helper.kill()
        resume(restored, server)
    assert [f.index for f in restored.failures] == [0, 1, 2]
    assert all("repair mode not switched off" in f.reason for f in restored.failures)
    assert restored.sockets == [None, None, None]


def test_hostile_records_create_nothing(switcher: Switcher, pairs: list[Pair]) -> None:
    pair = Pair()
    pairs.append(pair)
    good = checkpoint([pair.server], switcher).states[0]
    bad = dataclasses.replace(good, state=TcpState.FIN_WAIT2, unsent=b"x")
    before = open_fds()
    with pytest.raises(RecordError, match=r"record 1 \(127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+\): FIN_WAIT2 means"):
        restore([good, bad], switcher)
    with pytest.raises(RecordError, match="truncated"):
        restore(decode(encode([good, good])[:-1]), switcher)
    assert open_fds() == before


def test_checkpoint_leaves_out_what_cannot_move(tmp_path: Path, pairs: list[Pair]) -> None:
    """A listening socket, a UDP socket, a reset connection, a pipe and a closed socket are reported.

    The helper never sees them, and the good connection still moves.
    """
    good, reset = Pair(), Pair()
    pairs += [good, reset]
    reset.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.peer.close()
    time.sleep(0.05)
    with (
        socket.socket() as listening,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        helper_server(tmp_path) as (server, _),
    ):
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed = socket.socket()
        closed.close()
        read_end, write_end = os.pipe()
        try:
            frozen = checkpoint([listening, good.server, udp, reset.server, read_end, closed], server)
        finally:
            os.close(read_end)
            os.close(write_end)
        assert server.attached, "the helper was never asked to switch what it would refuse"
        assert frozen.indices == [1]
        assert [f.index for f in frozen.failures] == [0, 2, 3, 4, 5]
        reasons = {f.index: f.reason for f in frozen.failures}
        assert reasons[0] == "cannot move a connection in state LISTEN"
        assert reasons[2].startswith("not a TCP socket")
        assert reasons[3] == "cannot move a connection in state CLOSE"
        assert reasons[4] == "not a socket (ENOTSOCK)"
        assert reasons[5].startswith("not a socket")
        thaw([good.server], server)
    good.server.sendall(b"still here")
    assert recv_exactly(good.peer, 10) == b"still here"


def test_thaw_gives_the_connection_back(switcher: Switcher, pairs: list[Pair]) -> None:
    pair = Pair()
    pairs.append(pair)
    frozen = checkpoint([pair.server], switcher)
    assert frozen.failures == []
    thaw([pair.server], switcher)
    assert not repair_state(pair.server)
    pair.server.sendall(b"carry on")
    assert recv_exactly(pair.peer, 8) == b"carry on"


def test_dump_refuses_a_socket_not_in_repair_mode(pairs: list[Pair]) -> None:
    pair = Pair()
    pairs.append(pair)
    with pytest.raises(DumpError, match="not in repair mode"):
        dump(pair.server.fileno())


def test_direct_switcher_error_names_the_socket() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        with pytest.raises(RepairError, match=r"TCP_REPAIR, ON\) on descriptor \d+: EPERM") as caught:
            DirectSwitcher().switch([listening], Command.ON)
    assert caught.value.confirmed == 0


def test_peek_offset_does_not_hide_bytes(switcher: Switcher, pairs: list[Pair]) -> None:
    """An application's SO_PEEK_OFF would make the dump skip bytes: it is turned off for the dump, then put back."""
    pair = Pair()
    pairs.append(pair)
    pair.peer.sendall(b"0123456789")
    deadline = time.monotonic() + 5
    while _inq(pair.server) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pair.server.setsockopt(socket.SOL_SOCKET, 42, 0)  # SO_PEEK_OFF
    assert pair.server.recv(4, socket.MSG_PEEK) == b"0123"  # the offset moves on to 4
    frozen = checkpoint([pair.server], switcher)
    assert frozen.failures == []
    assert frozen.states[0].received == b"0123456789"
    thaw([pair.server], switcher)
    assert pair.server.getsockopt(socket.SOL_SOCKET, 42) == 4


def test_checkpoint_lays_the_stream_out_in_a_given_buffer(switcher: Switcher, pairs: list[Pair]) -> None:
    """A buffer big enough holds the stream (and is reused); one too small is left alone."""
    pairs.extend(Pair() for _ in range(2))
    for p in pairs:
        p.peer.sendall(b"queued")
    deadline = time.monotonic() + 5
    while any(_inq(p.server) < 6 for p in pairs):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    big, small = bytearray(4096), bytearray(16)
    frozen = checkpoint([pairs[0].server], switcher, buffer=big)
    assert bytes(frozen.data) == encode(frozen.states)
    assert big.startswith(bytes(frozen.data))
    assert frozen.states[0].received == b"queued"
    other = checkpoint([pairs[1].server], switcher, buffer=small)
    assert bytes(other.data) == encode(other.states)
    assert small == bytearray(16)
    ready = stream_buffer(4096)  # faulted in beforehand, as a server keeps it
    again = checkpoint([pairs[1].server], switcher, buffer=ready)
    assert ready[: len(again.data)] == bytes(again.data) == encode(again.states)
    assert again.states[0].received == b"queued"
    thaw([p.server for p in pairs], switcher)


def test_checkpoint_reports_a_unix_stream_socket(switcher: Switcher, pairs: list[Pair]) -> None:
    """A connected AF_UNIX stream socket (unnamed: its address is '') is a failure like any other non-TCP one."""
    good = Pair()
    pairs.append(good)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    named = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right, named:
        frozen = checkpoint([left, good.server, named, right], switcher)
        assert frozen.indices == [1]
        assert [f.index for f in frozen.failures] == [0, 2, 3]
        for failure in frozen.failures:
            assert failure.reason.startswith("not a TCP socket"), failure
            assert failure.connection.startswith("descriptor "), failure
        left.sendall(b"unix still works")
        assert right.recv(64) == b"unix still works"
    thaw([good.server], switcher)
    good.server.sendall(b"still here")
    assert recv_exactly(good.peer, 10) == b"still here"


# -- steps asked twice: refused, nothing changed -----------------------------


def _stalled(family: socket.AddressFamily = socket.AF_INET) -> tuple[Pair, int]:
    """A pair whose server has 3 MB unsent behind the peer's closed window, in a buffer with room for more."""
    pair = Pair(family, peer_rcvbuf=4096)
    pair.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    pair.server.setblocking(False)
    queued = pair.server.send(bytes(3 << 20))
    pair.server.setblocking(True)
    assert queued == 3 << 20
    return pair, queued


def test_resume_twice_is_refused_and_changes_nothing(switcher: Switcher, pairs: list[Pair], lo: Loopback) -> None:
    """A second resume() must not push the unsent bytes again (nor reset the connection when they do not fit)."""
    pair, queued = _stalled()
    pairs.append(pair)
    lo.cut()
    frozen = checkpoint([pair.server], switcher)
    assert len(frozen.states[0].unsent) > 2 << 20, "megabytes behind the zero window"
    pair.server.close()
    restored = restore(decode(encode(frozen.states)), switcher)
    lo.attach()
    resume(restored, switcher)
    assert restored.failures == []
    new = restored.sockets[0]
    assert new is not None
    with pytest.raises(StepError, match=r"resume\(\): connection 0 \(.*\) is already resumed"):
        resume(restored, switcher)
    assert restored.failures == []
    assert restored.sockets[0] is new
    assert not repair_state(new)
    assert recv_exactly(pair.peer, queued) == bytes(queued)
    new.sendall(b"end")
    assert recv_exactly(pair.peer, 3) == b"end", "every byte once, then what came after: nothing sent twice"
    new.close()
    assert pair.peer.recv(1) == b""


def test_restore_of_states_already_restored_is_refused(switcher: Switcher, pairs: list[Pair], lo: Loopback) -> None:
    """The same states restored again while their sockets are open: refused before any socket is made."""
    pair = Pair()
    pairs.append(pair)
    pair.peer.sendall(b"queued")
    time.sleep(0.05)
    lo.cut()
    frozen = checkpoint([pair.server], switcher)
    pair.server.close()
    states = decode(encode(frozen.states))
    first = restore(states, switcher)
    assert first.failures == []
    before = open_fds()
    with pytest.raises(StepError, match=r"restore\(\): record 0 \(.*\) is already restored"):
        restore(states, switcher)
    assert open_fds() == before
    assert dataclasses.replace(states[0]) == states[0], "the mark is not part of the record"
    old = first.sockets[0]
    assert old is not None
    old.close()  # in repair mode: silent, and the record may be restored anew
    again = restore(states, switcher)
    lo.attach()
    resume(again, switcher)
    assert again.failures == []
    new = again.sockets[0]
    assert new is not None
    new.settimeout(10)
    assert recv_exactly(new, 6) == b"queued"
    new.sendall(b"moved")
    assert recv_exactly(pair.peer, 5) == b"moved"
    new.close()


def test_thaw_twice_is_refused(switcher: Switcher, pairs: list[Pair]) -> None:
    pair = Pair()
    pairs.append(pair)
    checkpoint([pair.server], switcher)
    thaw([pair.server], switcher)
    with pytest.raises(StepError, match=r"thaw\(\): connection 0 \(.*\) is not frozen"):
        thaw([pair.server], switcher)
    pair.server.sendall(b"carry on")
    assert recv_exactly(pair.peer, 8) == b"carry on"


# -- what the docs say happens -------------------------------------------------

MIGRATION_DOC = Path(__file__).resolve().parent.parent / "docs" / "migration.md"


def test_fin_wait2_resumes_in_fin_wait1_and_the_fin_is_sent_again(
    switcher: Switcher, pairs: list[Pair], lo: Loopback
) -> None:
    """As docs/migration.md says: FIN_WAIT1 after resume, the FIN again when the retransmission timer fires."""
    pair = Pair()
    pairs.append(pair)
    pair.server.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 5
    while state_of(pair.server) != TcpState.FIN_WAIT2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pair.peer.recv(1) == b""
    restored = move([pair.server], switcher, lo)
    resumed_at = time.monotonic()
    new = restored.sockets[0]
    assert new is not None
    assert state_of(new) == TcpState.FIN_WAIT1, "no window probe outside ESTABLISHED: nothing acknowledges the FIN yet"
    while state_of(new) != TcpState.FIN_WAIT2:
        assert time.monotonic() < resumed_at + 5, "the retransmitted FIN is acknowledged"
        time.sleep(0.01)
    waited = time.monotonic() - resumed_at
    assert 0.1 < waited < 3, f"the FIN went again when the retransmission timer fired, not after {waited:.2f} s"
    doc = " ".join(MIGRATION_DOC.read_text().split())
    assert "never transmitted" not in doc
    assert "`FIN_WAIT2` connection is `FIN_WAIT1` after `resume`" in doc
    pair.peer.sendall(b"the peer still talks")
    new.settimeout(10)
    assert recv_exactly(new, 20) == b"the peer still talks"
    new.close()


def test_restore_without_the_local_address_fails_at_bind(switcher: Switcher, pairs: list[Pair]) -> None:
    """The address is not on this host: bind() fails with EADDRNOTAVAIL, the errno docs/migration.md names."""
    pair = Pair()
    pairs.append(pair)
    state = checkpoint([pair.server], switcher).states[0]
    thaw([pair.server], switcher)
    elsewhere = dataclasses.replace(state, local=("198.18.255.254", state.local[1]))
    restored = restore([elsewhere], switcher)
    assert [f.reason.split(":")[0:2] for f in restored.failures] == [
        ["bind()", " EADDRNOTAVAIL (Cannot assign requested address)"]
    ]
    assert restored.sockets == [None]
    doc = " ".join(MIGRATION_DOC.read_text().split())
    assert "(`bind()` fails with `EADDRNOTAVAIL` otherwise," in doc
    assert "(`ENETUNREACH` otherwise)" not in doc


def test_a_full_send_buffer_behind_a_small_window_resumes(switcher: Switcher, pairs: list[Pair], lo: Loopback) -> None:
    """Megabytes unsent fill the source's whole buffer: the target's segments are the same size, so they fit too.

    Segments of half the peer's small window, 12 bytes shorter on the target (the clamp less the timestamp
    option), made more buffers of overhead than the source had, and the unsent bytes failed with ENOBUFS.
    """
    pair = Pair(peer_rcvbuf=4096)
    pairs.append(pair)
    pair.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    queued = _fill_window(pair.server)
    segment = pair.server.getsockopt(SOL_TCP, socket.TCP_MAXSEG)
    restored = move([pair.server], switcher, lo)
    new = restored.sockets[0]
    assert new is not None
    assert new.getsockopt(SOL_TCP, socket.TCP_MAXSEG) == segment, "the segment size the source used"
    assert recv_exactly(pair.peer, queued) == bytes(queued)
    new.close()
