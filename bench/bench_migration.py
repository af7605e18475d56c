"""Benchmark: migrate N connections through the helper and split the cost.

For each N (100, 1,000 and 10,000 by default) the benchmark makes two
network namespaces joined by a veth pair: a peer process in one holds N
connections to this process in the other. Each connection has 16 KiB the
peer sent that this side has not read, and 64 KiB this side sent that the
peer never acknowledged (the peers' link goes down once the bytes are
out, so nothing answers). Then, timed:

    dump         repair mode on through the helper, every socket read out,
                 straight into the encoded stream (Checkpoint.data)
    encode       taking that stream (encode(states) would copy it again)
    close        the frozen sockets (in repair mode: nothing is sent)
    decode       the stream to states (views, no copy)
    restore      new sockets, repair mode on through the helper, filled;
                 repair mode off through the helper, unsent tails, FINs

Time spent waiting for the helper (its round trips, batches of 253) is
counted apart from the work on this side. Connections move in rounds of
1,000 through one reused buffer, and each round's source sockets are
closed before its target sockets are made: both sets at once would not fit
the 20,000 descriptors a process may hold at 10,000 connections. The peers
live in their own process for that reason. A veth MTU of 64 KiB keeps the
kernel's per-segment overhead, and so its TCP memory (net.ipv4.tcp_mem),
low: 10,000 connections hold about 1 GB of queued bytes.

Not timed, and printed apart:
- Making the buffer. It is made before the timed part with every page
  faulted in (`stream_buffer`), as the buffer a server that moves
  connections keeps ready (about 30 ms for the 80 MB of a round of 1,000).
  Every byte the dump copies into it is timed.
- Warming the VM's memory. This VM hands memory the guest frees back to
  the host (virtio-balloon free page reporting), and the first touch of
  such memory costs a fault in the host: the kernel's buffers for the
  restored queues come from it. Touching 200 KiB per connection once and
  freeing it (`--cold` skips this) makes 10,000 connections cost what
  1,000 do; without it their restore took up to twice as long per
  connection here.
  The kernel still allocates and fills every buffer inside the timing.

Run as root: `python bench/bench_migration.py [--cold] [N ...]`.
`measure(counts)` returns the figures as a dict for bench/run.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import mmap
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from passt_repair.protocol import Command
from passt_repair.server import RepairServer, SocketLike
from passt_repair.tcp import checkpoint, decode, restore, resume, stream_buffer

SENT = 64 << 10
RECEIVED = 16 << 10
PORT = 7000
SOURCE_ADDR, PEER_ADDR = "198.18.10.1", "198.18.10.2"
GOAL_1000_MS = 100.0
#: Connections moved per round through one reused buffer (80 MB at 80 KiB each).
ROUND = 1000
PARTS = ("round_trips", "dump", "encode", "close", "decode", "restore")
GOAL_RATIO = 1.3
#: Memory touched and freed before the timed part, per connection (see the module's docstring).
WARM_PER_CONNECTION = 200 << 10
CLONE_NEWNET = 0x40000000

PEER = """
import socket, struct, sys
n, host, port, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
held = []
for _ in range(n):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # gone at exit, not orphaned
    s.sendall(b"r" * size)
    held.append(s)
print("connected", flush=True)
sys.stdin.read()
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def _namespaces() -> Iterator[tuple[str, str]]:
    """A source and a peer namespace joined by a veth pair; this thread stays in the source one."""
    tag = f"prb{os.getpid()}"
    source, peer = f"{tag}-src", f"{tag}-peer"
    made: list[str] = []
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        for ns in (source, peer):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("-n", source, "link", "add", "eth0", "mtu", "65535", "type", "veth", "peer", "name", "eth0",
            "netns", peer, "mtu", "65535")  # fmt: skip
        for ns, addr in ((source, SOURCE_ADDR), (peer, PEER_ADDR)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        fd = os.open(f"/run/netns/{source}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        yield source, peer
    finally:
        libc.setns(home, CLONE_NEWNET)
        os.close(home)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


class TimedSwitcher:
    """A RepairServer whose switch() time is added up: the helper's round trips."""

    def __init__(self, server: RepairServer) -> None:
        self.server = server
        self.seconds = 0.0
        self.messages = 0

    def switch(self, sockets: Iterable[SocketLike], command: Command) -> None:
        items = list(sockets)
        start = time.perf_counter()
        try:
            self.server.switch(items, command)
        finally:
            self.seconds += time.perf_counter() - start
            self.messages += (len(items) + 252) // 253

    def take(self) -> float:
        spent, self.seconds = self.seconds, 0.0
        return spent


def _helper_command() -> list[str]:
    script = Path(sys.executable).with_name("passt-repair")
    return [str(script)] if script.exists() else [sys.executable, "-m", "passt_repair"]


def _connections(n: int, peer_ns: str) -> tuple[list[socket.socket], subprocess.Popen[bytes]]:
    """N connections with 16 KiB unread and 64 KiB unacknowledged on this side; and the peer process."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((SOURCE_ADDR, PORT))
    listener.listen(4096)
    argv = ["ip", "netns", "exec", peer_ns, sys.executable, "-c", PEER, str(n), SOURCE_ADDR, str(PORT), str(RECEIVED)]
    peer = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    socks = [listener.accept()[0] for _ in range(n)]
    listener.close()
    assert peer.stdout is not None
    if peer.stdout.readline().strip() != b"connected":
        raise RuntimeError("the peer process failed")
    _wait(lambda: all(_inq(s) == RECEIVED for s in socks), "the peers' bytes to arrive")
    # The peers' link goes down: what is sent stays unacknowledged, and the target's retransmissions
    # later die at once in this side's qdisc (no carrier) instead of costing the peers' CPU.
    _ip("-n", peer_ns, "link", "set", "eth0", "down")
    payload = b"s" * SENT
    for s in socks:
        if s.send(payload, socket.MSG_DONTWAIT) != SENT:
            raise RuntimeError("the send buffer did not take 64 KiB at once")
    _wait(lambda: all(_outq(s) == (SENT, 0) for s in socks), "every byte to be sent")
    return socks, peer


def _drop(s: socket.socket) -> None:
    """Close with a reset: a graceful close would leave an orphan retransmitting into the dead link for minutes."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _warm(size: int) -> float:
    """Fault `size` bytes of fresh memory in and free it again; return the seconds it took."""
    start = time.perf_counter()
    mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE).close()
    return time.perf_counter() - start


def _inq(s: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(s.fileno(), 0x541B, b"\0" * 4))[0])


def _outq(s: socket.socket) -> tuple[int, int]:
    outq = struct.unpack("i", fcntl.ioctl(s.fileno(), 0x5411, b"\0" * 4))[0]
    notsent = struct.unpack("i", fcntl.ioctl(s.fileno(), 0x894B, b"\0" * 4))[0]
    return int(outq), int(notsent)


def _wait(check: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def measure_one(n: int, *, cold: bool = False) -> dict[str, Any]:
    """Migrate n connections once; return the seconds spent in each part (`cold`: without warming memory)."""
    with _namespaces() as (_, peer_ns), tempfile.TemporaryDirectory() as tmp:
        socks, peer = _connections(n, peer_ns)
        path = Path(tmp) / "bench.repair"
        helper = None
        new: list[socket.socket] = []
        try:
            with RepairServer(path, reply_timeout=30) as server:
                helper = subprocess.Popen([*_helper_command(), str(path)], stderr=subprocess.PIPE)
                server.accept(timeout=20)
                switcher = TimedSwitcher(server)
                parts = dict.fromkeys(PARTS, 0.0)
                t0 = time.perf_counter()
                # The buffer a migrating server keeps ready, reused by every round: not timed.
                buffer = stream_buffer(min(n, ROUND) * (SENT + RECEIVED + 256) + 64)
                prepared = time.perf_counter() - t0
                warmed = 0.0 if cold else _warm(n * WARM_PER_CONNECTION)
                gc.collect()
                gc.disable()
                start = time.perf_counter()
                size = 0
                for first in range(0, n, ROUND):
                    part = socks[first : first + ROUND]
                    t0 = time.perf_counter()
                    frozen = checkpoint(part, switcher, buffer=buffer)
                    t1 = time.perf_counter()
                    data = frozen.data  # encoded while dumping; encode(frozen.states) makes the same bytes
                    t2 = time.perf_counter()
                    for s in part:
                        s.close()
                    t3 = time.perf_counter()
                    states = decode(data, copy=False)
                    t4 = time.perf_counter()
                    trips = switcher.take()
                    parts["dump"] += t1 - t0 - trips
                    parts["encode"] += t2 - t1
                    parts["close"] += t3 - t2
                    parts["decode"] += t4 - t3
                    parts["round_trips"] += trips
                    restored = restore(states, switcher)
                    resume(restored, switcher)
                    trips = switcher.take()
                    parts["restore"] += time.perf_counter() - t4 - trips
                    parts["round_trips"] += trips
                    size += len(data)
                    if len(data) > len(buffer):
                        raise RuntimeError("the stream did not fit the buffer made for it")
                    new += [s for s in restored.sockets if s is not None]
                    if frozen.failures or restored.failures:
                        raise RuntimeError(f"failures: {(frozen.failures + restored.failures)[:3]}")
                    if any(len(st.sent) != SENT or len(st.received) != RECEIVED for st in states):
                        raise RuntimeError("a connection did not have the queues the benchmark asked for")
                total = time.perf_counter() - start
                gc.enable()
                if len(new) != n:
                    raise RuntimeError(f"{len(new)} of {n} connections moved")
        finally:
            gc.enable()
            for s in socks + new:
                _drop(s)
            if helper is not None:
                helper.kill()
                helper.communicate()
            assert peer.stdin is not None
            peer.stdin.close()
            peer.kill()
            peer.wait()
    return {
        "connections": n,
        "bytes": size,
        "round": min(n, ROUND),
        "helper_messages": switcher.messages,
        "total_s": total,
        "buffer_bytes": len(buffer),
        "buffer_prepared_s": prepared,
        "memory_warmed_s": warmed,
        "parts_s": parts,
        "per_connection_us": total / n * 1e6,
    }


def measure(counts: list[int], *, cold: bool = False) -> dict[str, Any]:
    """Figures for each count, the per-connection ratio of the largest to the smallest, and the goals."""
    runs = [measure_one(n, cold=cold) for n in counts]
    result: dict[str, Any] = {"runs": runs, "cold": cold}
    if len(runs) > 1:
        result["ratio_per_connection"] = runs[-1]["per_connection_us"] / runs[0]["per_connection_us"]
        result["ratio_of"] = [runs[-1]["connections"], runs[0]["connections"]]
    for run in runs:
        if run["connections"] == 1000:
            result["ms_for_1000"] = run["total_s"] * 1e3
    result["goals"] = {"ms_for_1000": GOAL_1000_MS, "ratio_per_connection": GOAL_RATIO}
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cold = "--cold" in args
    counts = [int(a) for a in args if a != "--cold"] or [100, 1000, 10000]
    if os.geteuid() != 0:
        print("bench_migration: needs root (it makes network namespaces)", file=sys.stderr)
        return 1
    result = measure(counts, cold=cold)
    parts = list(result["runs"][0]["parts_s"])
    print(f"{'N':>6} {'total ms':>9} {'us/conn':>8} " + " ".join(f"{p:>11}" for p in parts) + "   (ms)")
    for run in result["runs"]:
        cells = " ".join(f"{run['parts_s'][p] * 1e3:>11.1f}" for p in parts)
        print(f"{run['connections']:>6} {run['total_s'] * 1e3:>9.1f} {run['per_connection_us']:>8.1f} {cells}")
    if "ratio_per_connection" in result:
        big, small = result["ratio_of"]
        print(f"per-connection cost, {big} vs {small}: {result['ratio_per_connection']:.2f}x (goal <= {GOAL_RATIO})")
    for run in result["runs"]:
        warmed = "not warmed (--cold)" if cold else f"warmed in {run['memory_warmed_s'] * 1e3:.0f} ms"
        print(
            f"{run['connections']:>6}: not in the total: the {run['buffer_bytes'] / 1e6:.0f} MB buffer faulted in"
            f" beforehand in {run['buffer_prepared_s'] * 1e3:.1f} ms; memory {warmed}"
        )
    if "ms_for_1000" in result:
        print(f"1,000 connections end to end: {result['ms_for_1000']:.1f} ms (goal <= {GOAL_1000_MS:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
