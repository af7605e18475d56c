# SPDX-License-Identifier: GPL-2.0-or-later
"""The peer's view of the timestamp clock across a move: it never goes backwards (PAWS, RFC 7323).

A paced socket keeps its next departure time (tcp_wstamp_ns) ahead of the
clock that TCP_TIMESTAMP reads, and every segment it sends in between, the
ACKs for what the peer sends included, carries that time as its TSval; the
record carries the lead (`dump.pacing_lead`). Here a bulk stream from the
moving side is paced (SO_MAX_PACING_RATE, which every congestion control
obeys: each segment puts the departure time hundreds of milliseconds
ahead), the peer talks back a little, the connection moves between network
namespaces in the order of docs/migration.md, and the peer captures every
segment (AF_PACKET on its interface): the first TSval from the target must
not be below the last one from the source.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import Topology, entered
from passt_repair.tcp import DirectSwitcher, checkpoint, decode, encode, restore, resume

PORT = 5001
SO_MAX_PACING_RATE = 47
TCP_TIMESTAMP = 24
ETH_P_ALL = 0x0003
#: Bytes per second: one 1,448-byte segment, the smallest paced burst, takes 362 ms at this rate.
PACING_RATE = 4_000

CONGESTION = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()


def tsvals(frame: bytes, port: int) -> tuple[bytes, int] | None:
    """(source MAC, TSval) of a TCP segment from `port` in an Ethernet frame, or None."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0800 and frame[23] == socket.IPPROTO_TCP:
        tcp = 14 + (frame[14] & 0xF) * 4
    elif ethertype == 0x86DD and frame[20] == socket.IPPROTO_TCP:
        tcp = 14 + 40
    else:
        return None
    if struct.unpack_from("!H", frame, tcp)[0] != port:
        return None
    at, end = tcp + 20, tcp + (frame[tcp + 12] >> 4) * 4
    while at < end:
        kind = frame[at]
        if kind == 0:
            break
        if kind == 1:
            at += 1
            continue
        if kind == 8:
            return frame[6:12], struct.unpack_from("!I", frame, at + 2)[0]
        at += frame[at + 1]
    return None


class Capture:
    """Every TSval the peer sees from `port`, with the sender's MAC, in arrival order."""

    def __init__(self, net: Topology, port: int) -> None:
        with entered(net.ns("peer")):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("eth0", 0))
        self.sock.settimeout(0.1)
        self.port = port
        self.seen: list[tuple[bytes, int]] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                frame = self.sock.recv(65536)
            except TimeoutError:
                continue
            found = tsvals(frame, self.port)
            if found:
                self.seen.append(found)

    def stop(self) -> list[tuple[bytes, int]]:
        self.running = False
        self.thread.join(5)
        self.sock.close()
        return self.seen


def drain(sock: socket.socket, stop: threading.Event, got: list[int]) -> None:
    """Read the bulk stream, and talk back a little: the moving side's ACKs then carry its paced stamps."""
    next_talk = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_talk:
            sock.send(b"ack me")
            next_talk = time.monotonic() + 0.01
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            return
        got[0] += len(data)


def _after(a: int, b: int) -> bool:
    return 0 < (a - b) % 2**32 < 2**31


@pytest.fixture
def net() -> Iterator[Topology]:
    with Topology(["peer", "source", "target"], tag="ts") as topology:
        yield topology


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("congestion", CONGESTION)
def test_target_tsval_never_below_the_source(net: Topology, congestion: str, family: int) -> None:
    service = net.service4 if family == 4 else net.service6
    v4, v6 = ([service], []) if family == 4 else ([], [service])
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    net.add_addresses("source", v4, v6)
    with entered(net.ns("source")):
        listener = socket.socket(af, socket.SOCK_STREAM)
    with contextlib.ExitStack() as stack:
        stack.enter_context(listener)
        listener.bind((service, PORT))
        listener.listen(1)
        with entered(net.ns("peer")):
            peer = stack.enter_context(socket.create_connection((service, PORT), timeout=10))
        peer.settimeout(0.01)
        moving, _ = listener.accept()
        moving.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        moving.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, PACING_RATE)
        moving.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        capture = Capture(net, PORT)
        stop, got = threading.Event(), [0]
        reader = threading.Thread(target=drain, args=(peer, stop, got), daemon=True)
        reader.start()
        moving.setblocking(False)
        queued = moving.send(bytes(256 << 10))
        time.sleep(1.5)  # ten segments at once (pacing starts after them), then one or two every 362 ms

        switcher = DirectSwitcher()
        net.del_addresses("source", v4, v6)  # 1. the source stops receiving
        frozen = checkpoint([moving], switcher)  # 2. freeze and dump
        assert frozen.failures == []
        clock_at_dump = moving.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
        data = encode(frozen.states)
        moving.close()
        net.cut("target")  # 3. restore while cut off
        net.add_addresses("target", v4, v6)
        with entered(net.ns("target")):
            restored = restore(decode(data), switcher)
        assert restored.failures == []
        net.attach("target")  # 4. reattach, announce, resume
        net.announce("target", v4, v6)
        resume(restored, switcher)
        assert restored.failures == []
        new = restored.sockets[0]
        assert new is not None
        stack.enter_context(new)
        time.sleep(1.0)  # the target's first segments reach the peer
        stop.set()
        reader.join(5)
        seen = capture.stop()

    source_mac, target_mac = net.mac("source"), net.mac("target")
    from_source = [ts for mac, ts in seen if mac == source_mac]
    from_target = [ts for mac, ts in seen if mac == target_mac]
    assert from_source, "the peer saw the source's segments"
    assert from_target, f"the peer saw the target's segments ({got[0]} of {queued} bytes read)"
    last = max(from_source, key=lambda ts: (ts - from_source[0]) % 2**32)
    first = from_target[0]
    lead = (last - clock_at_dump) % 2**32
    assert not _after(last, first), (
        f"TSval went back from {last} (source, {lead} ms ahead of its clock at the dump) to {first} (target)"
    )
    assert all(not _after(a, b) for a, b in itertools.pairwise(from_target)), "target's clock monotonic"


def test_the_lead_is_added_in_the_sockets_own_unit() -> None:
    """Milliseconds on a millisecond clock (low bit clear), microseconds on a microsecond one (bit set, kept)."""
    from passt_repair.tcp.dump import pacing_lead, timestamp_ahead

    rate = 10_000_000  # bytes per second: 2 x 64 KiB take 13.1 ms
    lead = pacing_lead(rate)
    assert lead % 2 == 0
    assert 14 <= lead <= 16
    assert timestamp_ahead(1_000_000, rate) == 1_000_000 + lead
    assert timestamp_ahead(1_000_001, rate) == 1_000_001 + lead * 1000
    assert timestamp_ahead(0xFFFFFFFE, rate) == lead - 2  # wraps as the 32-bit clock does
    assert timestamp_ahead(1_000_000, 0) == timestamp_ahead(1_000_000, 2**64 - 1) == 1_000_000  # not paced
