# SPDX-License-Identifier: GPL-2.0-or-later
"""EXPERIMENT, not the library: the system calls of a migration and nothing else, for the floor.

A mover for bench/bench_migration.py (`python -m bench.variants.migration_floor`,
given the connections as inherited descriptors listed on stdin, like the
others): in rounds of 1,000, every system call that passt_repair.tcp's
checkpoint, the source's close, restore and resume make per connection, in
the same order, from the least Python that can make them: no records, no
checks, no stream, no failure handling. What the target needs (addresses,
sequence numbers, window) is read with the library before each round's
timed part, and the queues' bytes are peeked into one buffer as the library
does.

The difference between this and passt_repair.tcp's figures is what the
library's own work costs; the difference between this and the C reference
is what making the same calls from Python costs.
"""

from __future__ import annotations

import fcntl
import gc
import json
import mmap
import select
import socket
import struct
import time
from typing import Any

from bench.bench_migration import PER_CONNECTION, ROUND, _check_moved, _drop, _vm_hwm_kib, _warm, read_orders

from passt_repair.tcp import DirectSwitcher, checkpoint, stream_buffer

SOL_TCP = 6
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
INT = b"\0" * 4
#: family, local, remote, timestamp, snd_seq, rcv_seq (packed), segment size, repair options, window
Target = tuple[int, tuple[str, int], tuple[str, int], bytes, bytes, bytes, int, bytes, bytes]


def _plan(socks: list[socket.socket], buffer: mmap.mmap) -> list[Target]:
    """What the target needs per connection, read with the library before the timed part (into `buffer`)."""
    # Left in repair mode: thawed, they would retransmit into the dead link during the timed part.
    frozen = checkpoint(socks, DirectSwitcher(), buffer=buffer)
    plan: list[Target] = []
    for st in frozen.states:
        w = st.window
        assert st.timestamp is not None, "the floor assumes timestamps, window scaling and SACK, as on the veth"
        options = struct.pack("8I", 2, st.mss, 3, st.snd_wscale | st.rcv_wscale << 16, 4, 0, 8, 0)
        plan.append(
            (
                st.family,
                st.local,
                st.remote,
                struct.pack("I", st.timestamp),
                struct.pack("I", st.snd_seq),
                struct.pack("I", st.rcv_seq),
                min(st.mss, 32767),
                options,
                struct.pack("5I", w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup),
            )
        )
    return plan


def _dump_calls(socks: list[socket.socket], stream: memoryview) -> list[tuple[int, int]]:
    """The library's dump calls; where each connection's queues went in `stream` (receive end, send end)."""
    views = []
    for s in socks:  # checkpoint: a view per descriptor, TCP_INFO read before the switch
        v = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 0, s.fileno())
        v.getsockopt(SOL_TCP, 11, 7)
        views.append(v)
    for v in views:
        v.setsockopt(SOL_TCP, 19, 1)  # TCP_REPAIR
    poller = select.poll()  # one poll() for all, as checkpoint makes it
    for v in views:
        poller.register(v.fileno(), 0x2000)  # POLLRDHUP
    poller.poll(0)
    ends = []
    off = 0
    for v in views:
        fd = v.fileno()
        get, set_ = v.getsockopt, v.setsockopt
        get(SOL_TCP, 2)  # TCP_MAXSEG
        get(SOL_TCP, 24)  # TCP_TIMESTAMP
        get(SOL_TCP, 29, 20)  # TCP_REPAIR_WINDOW
        outq = struct.unpack("i", fcntl.ioctl(fd, 0x5411, INT))[0]  # SIOCOUTQ
        fcntl.ioctl(fd, 0x894B, INT)  # SIOCOUTQNSD
        inq = struct.unpack("i", fcntl.ioctl(fd, 0x541B, INT))[0]  # SIOCINQ
        set_(SOL_TCP, 20, 1)  # receive queue
        get(SOL_TCP, 21, 4)  # TCP_QUEUE_SEQ
        v.getsockname()
        v.getpeername()
        for level, option in ((1, 72), (6, 1), (1, 9), (6, 4), (6, 5), (6, 6), (6, 18), (0, 1), (1, 36), (6, 25)):
            get(level, option)
        get(SOL_TCP, 13, 16)  # TCP_CONGESTION
        get(1, 42)  # SO_PEEK_OFF
        v.recv_into(stream[off : off + inq], inq, PEEK)
        set_(SOL_TCP, 20, 2)  # send queue
        get(SOL_TCP, 21, 4)
        v.recv_into(stream[off + inq : off + inq + outq], outq, PEEK)
        ends.append((off + inq, off + inq + outq))
        off += inq + outq
        v.detach()
    return ends


def _fill_calls(made: list[socket.socket], plan: list[Target], stream: memoryview, ends: list[tuple[int, int]]) -> None:
    start = 0
    for s, target, (received_end, sent_end) in zip(made, plan, ends, strict=True):
        _, local, remote, ts, snd, rcv, mss, options, window = target
        set_ = s.setsockopt
        s.bind(local)
        set_(SOL_TCP, 24, ts)
        set_(SOL_TCP, 20, 2)
        set_(SOL_TCP, 21, snd)
        set_(SOL_TCP, 20, 1)
        set_(SOL_TCP, 21, rcv)
        set_(SOL_TCP, 2, mss)
        s.connect(remote)
        set_(SOL_TCP, 2, 0)
        s.send(stream[start:received_end], socket.MSG_DONTWAIT)
        set_(SOL_TCP, 20, 2)
        s.send(stream[received_end:sent_end], socket.MSG_DONTWAIT)
        set_(SOL_TCP, 22, options)
        set_(SOL_TCP, 29, window)
        start = sent_end


def mover(warm: int, fds: list[int]) -> dict[str, Any]:
    """Move the connections on `fds` with the library's system calls alone; the seconds of each part."""
    socks = [socket.socket(fileno=fd) for fd in fds]
    buffer = stream_buffer(min(len(socks), ROUND) * PER_CONNECTION)
    stream = memoryview(buffer)
    warmed = _warm(warm) if warm else 0.0
    parts = {"dump": 0.0, "close": 0.0, "restore": 0.0}
    new: list[socket.socket] = []
    checked = size = 0
    for first in range(0, len(socks), ROUND):
        part = socks[first : first + ROUND]
        plan = _plan(part, buffer)  # not timed
        gc.collect()
        gc.disable()
        t0 = time.perf_counter()
        ends = _dump_calls(part, stream)
        t1 = time.perf_counter()
        for s in part:
            s.close()
        t2 = time.perf_counter()
        made = []
        for target in plan:
            s = socket.socket(target[0], socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            made.append(s)
        for s in made:
            s.setsockopt(SOL_TCP, 19, 1)
        _fill_calls(made, plan, stream, ends)
        for s in made:
            s.setsockopt(SOL_TCP, 19, 0)
        t3 = time.perf_counter()
        gc.enable()
        parts["dump"] += t1 - t0
        parts["close"] += t2 - t1
        parts["restore"] += t3 - t2
        size += ends[-1][1] if ends else 0
        checked += sum(map(_check_moved, made))
        new += made
    maxrss = _vm_hwm_kib()
    for s in new:
        _drop(s)
    return {
        "connections": len(fds),
        "checked": checked,
        "total_s": sum(parts.values()),
        **{f"{p}_s": v for p, v in parts.items()},
        "bytes": size,
        "buffer_bytes": len(stream),
        "maxrss_kib": maxrss,
        "memory_warmed_s": warmed,
    }


if __name__ == "__main__":
    print(json.dumps(mover(*read_orders())))
