"""EXPERIMENT, not the library: the system calls of a migration and nothing else, for the floor.

Run as root: `python bench/variants/migration_floor.py [N]` (default 1,000).
Same setup as bench/bench_migration.py (N connections, 64 KiB unacknowledged
and 16 KiB unread each, repair mode switched in this process as DirectSwitcher
does), then, timed, every
system call that checkpoint, the source's close, restore and resume make per
connection, in the same order, from the least Python that can make them: no
records, no checks, no stream, no failure handling. What the target needs
(addresses, sequence numbers, window) is read before the timed part.

The difference between this and bench_migration's total is what the
library's own work costs; this total is as low as a Python migration of these
connections can go on this machine.
"""

from __future__ import annotations

import fcntl
import gc
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.bench_migration import RECEIVED, SENT, _connections, _drop, _namespaces

from passt_repair.tcp import DirectSwitcher, checkpoint, stream_buffer, thaw

SOL_TCP = 6
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
INT = b"\0" * 4
#: local, remote, timestamp, snd_seq, rcv_seq (packed), segment size, sent, received, repair options, window
Target = tuple[tuple[str, int], tuple[str, int], bytes, bytes, bytes, int, bytes, bytes, bytes, bytes]


def _plan(socks: list[socket.socket]) -> list[Target]:
    """What the target needs per connection, read with the library before the timed part."""
    switcher = DirectSwitcher()
    frozen = checkpoint(socks, switcher)
    thaw(socks, switcher)
    plan: list[Target] = []
    for st in frozen.states:
        w = st.window
        assert st.timestamp is not None, "the floor assumes timestamps, window scaling and SACK, as on the veth"
        options = struct.pack("8I", 2, st.mss, 3, st.snd_wscale | st.rcv_wscale << 16, 4, 0, 8, 0)
        plan.append(
            (
                st.local,
                st.remote,
                struct.pack("I", st.timestamp),
                struct.pack("I", st.snd_seq),
                struct.pack("I", st.rcv_seq),
                min(st.mss, 32767),
                bytes(st.sent),
                bytes(st.received),
                options,
                struct.pack("5I", w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup),
            )
        )
    return plan


def _dump_calls(fds: list[int], stream: memoryview) -> None:
    off = 0
    for fd in fds:
        v = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 0, fd)
        get, set_ = v.getsockopt, v.setsockopt
        get(SOL_TCP, 11, 7)  # TCP_INFO
        get(SOL_TCP, 2)  # TCP_MAXSEG
        get(SOL_TCP, 24)  # TCP_TIMESTAMP
        get(SOL_TCP, 29, 20)  # TCP_REPAIR_WINDOW
        set_(SOL_TCP, 20, 2)  # send queue
        fcntl.ioctl(fd, 0x5411, INT)  # SIOCOUTQ
        fcntl.ioctl(fd, 0x894B, INT)  # SIOCOUTQNSD
        get(SOL_TCP, 21, 4)  # TCP_QUEUE_SEQ
        set_(SOL_TCP, 20, 1)  # receive queue
        fcntl.ioctl(fd, 0x541B, INT)  # SIOCINQ
        get(SOL_TCP, 21, 4)
        v.getsockname()
        v.getpeername()
        for level, option in ((1, 72), (6, 1), (1, 9), (6, 4), (6, 5), (6, 6), (6, 18), (0, 1), (1, 36)):
            get(level, option)
        get(SOL_TCP, 13, 16)  # TCP_CONGESTION
        get(1, 42)  # SO_PEEK_OFF
        v.recv_into(stream[off : off + RECEIVED], RECEIVED, PEEK)
        set_(SOL_TCP, 20, 2)
        v.recv_into(stream[off + RECEIVED : off + RECEIVED + SENT], SENT, PEEK)
        off += RECEIVED + SENT
        v.detach()


def _fill_calls(made: list[socket.socket], plan: list[Target]) -> None:
    for s, (local, remote, ts, snd, rcv, mss, sent, received, options, window) in zip(made, plan, strict=True):
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
        s.send(received, socket.MSG_DONTWAIT)
        set_(SOL_TCP, 20, 2)
        s.send(sent, socket.MSG_DONTWAIT)
        set_(SOL_TCP, 22, options)
        set_(SOL_TCP, 29, window)


def _switch(socks: list[socket.socket], value: int) -> None:
    for s in socks:
        s.setsockopt(SOL_TCP, 19, value)  # TCP_REPAIR


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with _namespaces() as (_, peer_ns):
        socks, peer = _connections(n, peer_ns)
        made: list[socket.socket] = []
        try:
            plan = _plan(socks)
            stream = memoryview(stream_buffer(n * (SENT + RECEIVED)))
            gc.collect()
            gc.disable()
            t0 = time.perf_counter()
            fds = [s.fileno() for s in socks]
            for fd in fds:  # what checkpoint reads before the switch: is it movable?
                v = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 0, fd)
                v.getsockopt(SOL_TCP, 11, 1)
                v.detach()
            _switch(socks, 1)
            _dump_calls(fds, stream)
            t1 = time.perf_counter()
            for s in socks:
                s.close()
            t2 = time.perf_counter()
            for _ in plan:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                made.append(s)
            _switch(made, 1)
            _fill_calls(made, plan)
            _switch(made, 0)
            t3 = time.perf_counter()
            gc.enable()
        finally:
            for s in socks + made:
                _drop(s)
            peer.kill()
            peer.wait()
    parts = {"dump": t1 - t0, "close": t2 - t1, "restore": t3 - t2}
    cells = ", ".join(f"{name} {seconds * 1e3:.1f}" for name, seconds in parts.items())
    print(f"{n} connections, the system calls alone: {(t3 - t0) * 1e3:.1f} ms ({cells})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
