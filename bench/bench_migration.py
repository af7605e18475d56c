# SPDX-License-Identifier: GPL-2.0-or-later
"""Benchmark: move N live connections with passt_repair.tcp and with a C checkpointer, side by side.

For each N (100, 1,000 and 10,000 by default) and each mover, the
benchmark makes two network namespaces joined by a veth pair: a peer
process in one holds N connections to this process in the other. Each
connection has 16 KiB the peer sent that this side has not read, and 64 KiB
this side sent that the peer never acknowledged (the peers' link goes down
once the bytes are out, so nothing answers). The connections are handed to
the mover, a process of its own that inherits them (this process closes its
copies first), and the mover, timed:

    dump     repair mode on (DirectSwitcher: the mover holds CAP_NET_ADMIN),
             every socket read out into one buffer
    close    the frozen sockets (in repair mode: nothing is sent)
    restore  new sockets, repair mode on, filled; repair mode off, and what
             comes after it (for passt_repair.tcp: decode, restore, resume)

The movers are `python -m bench.bench_migration --mover` (passt_repair.tcp's
checkpoint, decode, restore, resume) and bench/ref_checkpoint.c, compiled at
bench time: the system calls CRIU's libsoccr makes per connection and
nothing else (its header lists them). Both move the connections in rounds
of 1,000 through one buffer: a round's sources are closed before its
targets are made, as 10,000 connections and their targets would not fit the
20,000 descriptors a process may hold. After the timed part each checks
every new socket (ESTABLISHED, both queues' lengths) and reports its peak
RSS beside the bytes it held.

Not timed, on both sides alike:
- The buffer: made before the timed part with every page faulted in, as the
  buffer a program that moves connections keeps ready (`stream_buffer`).
- Warming the VM's memory. This VM hands memory the guest frees back to
  the host (virtio-balloon free page reporting), and the first touch of
  such memory costs a fault in the host: the kernel's buffers for the
  restored queues come from it. Each mover touches 200 KiB per connection
  once and frees it, after making its buffer and just before the timed part
  (`--cold` skips this): 10,000 connections then cost what 1,000 do. The
  kernel still allocates and fills every buffer inside the timing.
- Python's cyclic garbage collector is off in the timed part (a program
  moving connections can choose that; the library makes no cycles).

A veth MTU of 64 KiB keeps the kernel's per-segment overhead, and so its
TCP memory (net.ipv4.tcp_mem), low: 10,000 connections hold about 1 GB.

Each mover moves each N three times (`--repeat`), the movers taking turns
in an order that rotates; the figures are medians, and the ratios are of
medians measured in the same run.

Run as root, from the top of the tree:
`python -m bench.bench_migration [--cold] [--repeat K] [--baseline REV] [--json PATH] [N ...]`;
`--baseline REV` also times passt_repair.tcp as it was at git revision REV
(its src/ extracted under /tmp), in the same run. `measure(counts)` returns
the figures as a dict for bench/run.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import json
import mmap
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import build_c

SENT = 64 << 10
RECEIVED = 16 << 10
PORT = 7000
SOURCE_ADDR, PEER_ADDR = "198.18.10.1", "198.18.10.2"
#: Connections moved per round through one reused buffer (80 MB at 80 KiB each).
ROUND = 1000
#: Room per connection in the buffer: its queues and its record.
PER_CONNECTION = SENT + RECEIVED + 256
#: Issue 12's goals: end to end against the C reference at 1,000; per connection, 10,000 against 100.
GOAL_TO_C = 1.5
GOAL_RATIO = 1.3
#: Memory touched and freed before the timed part, per connection (see the module's docstring).
WARM_PER_CONNECTION = 200 << 10
CLONE_NEWNET = 0x40000000
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "build"
PARTS = ("dump", "close", "restore")
#: Each mover moves each count this many times, taking turns; the figures are medians.
REPEAT = 3

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
    """Fault `size` bytes of fresh memory in and free it again; return the seconds it took.

    The peak RSS is then reset to the present RSS (clear_refs 5), so that it
    tells the move's memory, not the warming's.
    """
    start = time.perf_counter()
    mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE).close()
    Path("/proc/self/clear_refs").write_text("5")
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


def baseline_source(rev: str) -> Path:
    """passt_repair's src/ as it was at git revision `rev`, extracted under /tmp (a PYTHONPATH for it).

    Not under bench/build/: mypy and ruff would check the old copy along with the project.
    """
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True, text=True
    )
    out = Path(tempfile.gettempdir()) / f"passt-repair-baseline-{sha.stdout.strip()}"
    if not (out / "src" / "passt_repair").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "src/passt_repair"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out / "src"


def _mover_argv(mover: str, reference: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))  # the library of this checkout, not an install
    if mover == "c":
        return [str(reference), str(ROUND), str(PER_CONNECTION)], env
    if mover == "floor":
        return [sys.executable, "-m", "bench.variants.migration_floor"], env
    if mover.startswith("baseline:"):
        env["PYTHONPATH"] = mover.split(":", 1)[1]
    return [sys.executable, "-m", "bench.bench_migration", "--mover"], env


def measure_one(n: int, mover: str, reference: Path, *, cold: bool = False) -> dict[str, Any]:
    """Move n connections once with `mover` ("python", "c" or "baseline:PATH"); its figures."""
    argv, env = _mover_argv(mover, reference)
    with _namespaces() as (_, peer_ns):
        socks, peer = _connections(n, peer_ns)
        try:
            fds = [s.fileno() for s in socks]
            warm = 0 if cold else n * WARM_PER_CONNECTION
            child = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=fds, cwd=ROOT, env=env
            )
            for s in socks:  # the mover holds the only descriptors now: its close is the last
                s.close()
            out, _ = child.communicate("\n".join(map(str, [warm, *fds])).encode(), timeout=600)
            if child.returncode != 0:
                raise RuntimeError(f"mover {mover} failed (exit {child.returncode})")
        finally:
            for s in socks:
                _drop(s)
            assert peer.stdin is not None
            peer.stdin.close()
            peer.kill()
            peer.wait()
    figures: dict[str, Any] = json.loads(out)
    if figures["checked"] != n:
        raise RuntimeError(f"mover {mover}: {figures['checked']} of {n} connections checked out")
    figures["per_connection_us"] = figures["total_s"] / n * 1e6
    return figures


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mover's figures over repeats: each part's median, and every repeat's total."""
    figures = dict(sorted(runs, key=lambda f: f["total_s"])[len(runs) // 2])
    for key in (*(f"{p}_s" for p in PARTS), "total_s", "per_connection_us"):
        figures[key] = statistics.median(f[key] for f in runs)
    figures["maxrss_kib"] = max(f["maxrss_kib"] for f in runs)
    figures["totals_s"] = [f["total_s"] for f in runs]
    figures["best_s"] = {p: min(f[f"{p}_s"] for f in runs) for p in (*PARTS, "total")}
    return figures


def measure(
    counts: Sequence[int], *, cold: bool = False, baseline: str | None = None, repeat: int = REPEAT
) -> dict[str, Any]:
    """Every mover at every count, `repeat` times taking turns; medians, the ratios to C, the goals."""
    reference = build_c("ref_checkpoint")
    movers = ["c", "python", "floor"]
    labels = {
        "c": "C reference (libsoccr's calls)",
        "python": "passt_repair.tcp",
        "floor": "Python floor: its calls alone (experiment)",
    }
    if baseline is not None:
        movers.append(f"baseline:{baseline_source(baseline)}")
        labels[movers[-1]] = f"passt_repair.tcp at {baseline} (experiment)"
    runs: list[dict[str, Any]] = []
    for n in counts:
        each: dict[str, list[dict[str, Any]]] = {m: [] for m in movers}
        for turn in range(repeat):
            for m in movers[turn % len(movers) :] + movers[: turn % len(movers)]:  # who goes first rotates
                each[m].append(measure_one(n, m, reference, cold=cold))
        by_mover = {m: _median_run(each[m]) for m in movers}
        c = by_mover["c"]
        ratios = {m: {p: f[f"{p}_s"] / c[f"{p}_s"] for p in (*PARTS, "total")} for m, f in by_mover.items() if m != "c"}
        for m, f in by_mover.items():
            if m != "c":
                ratios[m]["best"] = f["best_s"]["total"] / c["best_s"]["total"]
        runs.append({"connections": n, "movers": by_mover, "to_c": ratios})
    result: dict[str, Any] = {"runs": runs, "cold": cold, "labels": labels, "movers": movers, "repeat": repeat}
    if len(runs) > 1:
        big, small = runs[-1], runs[0]
        result["ratio_of"] = [big["connections"], small["connections"]]
        result["ratio_per_connection"] = {
            m: big["movers"][m]["per_connection_us"] / small["movers"][m]["per_connection_us"] for m in movers
        }
    for run in runs:
        if run["connections"] == 1000:
            result["to_c_1000"] = run["to_c"]["python"]["total"]
    result["goals"] = {"to_c_1000": GOAL_TO_C, "ratio_per_connection": GOAL_RATIO}
    return result


def table(result: dict[str, Any]) -> list[str]:
    """The figures as Markdown: each mover's parts (ms) and ratios to C, then memory."""
    labels, movers = result["labels"], result["movers"]
    lines = [
        f"Median ms of {result['repeat']} runs each, taking turns (end to end: its range); ratios of medians to C,"
        " and of the best runs (on a busy machine the least disturbed):",
        "",
        "| N | mover | dump | close | restore+resume | end to end | us/conn | / C: dump | restore | end to end"
        " | best |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        for m in movers:
            f = run["movers"][m]
            cells = " | ".join(f"{f[f'{p}_s'] * 1e3:.1f}" for p in PARTS)
            low, high = min(f["totals_s"]) * 1e3, max(f["totals_s"]) * 1e3
            cells += f" | {f['total_s'] * 1e3:.1f} ({low:.1f}-{high:.1f})"
            r = run["to_c"].get(m)
            ratio = (
                " | ".join(f"**{r[p]:.2f}**" if p == "total" else f"{r[p]:.2f}" for p in ("dump", "restore", "total"))
                + f" | {r['best']:.2f}"
                if r
                else "1 | 1 | 1 | 1"
            )
            lines.append(f"| {run['connections']:,} | {labels[m]} | {cells} | {f['per_connection_us']:.0f} | {ratio} |")
    if "ratio_per_connection" in result:
        big, small = result["ratio_of"]
        each = ", ".join(f"{labels[m]} {v:.2f}" for m, v in result["ratio_per_connection"].items())
        lines += ["", f"Per-connection cost, {big:,} / {small:,}: {each}."]
    last = result["runs"][-1]
    lines += ["", f"Peak RSS of the {last['connections']:,}-connection move (the mover's VmHWM):", ""]
    lines += ["| mover | peak RSS | bytes moved | bytes held at once (one round's buffer) |", "|---|---:|---:|---:|"]
    for m in movers:
        f = last["movers"][m]
        rss, moved, held = f["maxrss_kib"] / 1024, f["bytes"] / 1e6, f["buffer_bytes"] / 1e6
        lines.append(f"| {labels[m]} | {rss:.1f} MiB | {moved:.1f} MB | {held:.1f} MB |")
    warm = "not warmed (--cold)" if result.get("cold") else "warmed"
    lines += [
        "",
        "Not in the totals, on both sides: the buffer, faulted in beforehand, and the VM's memory "
        f"{warm} (bench/bench_migration.py says why).",
    ]
    return lines


# ---------------------------------------------------------------------------
# The Python mover: a process of its own, given the connections as inherited descriptors


def _check_moved(s: socket.socket) -> bool:
    """The new socket is ESTABLISHED and holds the queues it was given."""
    return s.getsockopt(6, 11, 1)[0] == 1 and _inq(s) == RECEIVED and _outq(s)[0] == SENT


def _vm_hwm_kib() -> int:
    """This process's peak RSS (VmHWM; ru_maxrss would carry the parent's over the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def read_orders() -> tuple[int, list[int]]:
    """A mover's orders on stdin: how many bytes of memory to warm, then the descriptors to move."""
    numbers = [int(word) for word in sys.stdin.read().split()]
    return numbers[0], numbers[1:]


def mover(warm: int, fds: list[int]) -> dict[str, Any]:
    """Move the connections on `fds` with passt_repair.tcp in rounds; the seconds of each part.

    `warm` bytes of memory are faulted in and freed after the buffer is made, just before the timing.
    """
    from passt_repair.tcp import DirectSwitcher, checkpoint, decode, restore, resume, stream_buffer

    socks = [socket.socket(fileno=fd) for fd in fds]
    switcher = DirectSwitcher()
    parts = dict.fromkeys(PARTS, 0.0)
    new: list[socket.socket] = []
    buffer = stream_buffer(min(len(socks), ROUND) * PER_CONNECTION + 64)
    warmed = _warm(warm) if warm else 0.0
    size = checked = 0
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    for first in range(0, len(socks), ROUND):
        part = socks[first : first + ROUND]
        t0 = time.perf_counter()
        frozen = checkpoint(part, switcher, buffer=buffer)
        data = frozen.data  # encoded while dumping: encode(frozen.states) makes the same bytes
        t1 = time.perf_counter()
        for s in part:
            s.close()
        t2 = time.perf_counter()
        restored = restore(decode(data, copy=False), switcher)
        resume(restored, switcher)
        t3 = time.perf_counter()
        parts["dump"] += t1 - t0
        parts["close"] += t2 - t1
        parts["restore"] += t3 - t2
        if frozen.failures or restored.failures:
            raise RuntimeError(f"failures: {(frozen.failures + restored.failures)[:3]}")
        size += len(data)
        made = [s for s in restored.sockets if s is not None]
        checked += sum(map(_check_moved, made))  # outside the timing, before the buffer is reused
        new += made
        start += time.perf_counter() - t3
    total = time.perf_counter() - start
    gc.enable()
    maxrss = _vm_hwm_kib()
    for s in new:
        _drop(s)
    return {
        "connections": len(fds),
        "checked": checked,
        "total_s": total,
        **{f"{p}_s": v for p, v in parts.items()},
        "bytes": size,
        "buffer_bytes": len(buffer),
        "maxrss_kib": maxrss,
        "memory_warmed_s": warmed,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    json_path = args[args.index("--json") + 1] if "--json" in args else None
    if args == ["--mover"]:
        print(json.dumps(mover(*read_orders())))
        return 0
    cold = "--cold" in args
    baseline = args[args.index("--baseline") + 1] if "--baseline" in args else None
    options = {args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--baseline", "--repeat", "--json")}
    counts = [int(a) for a in args if a.isdigit() and a not in options] or [100, 1000, 10000]
    if os.geteuid() != 0:
        print("bench_migration: needs root (it makes network namespaces)", file=sys.stderr)
        return 1
    repeat = int(args[args.index("--repeat") + 1]) if "--repeat" in args else REPEAT
    result = measure(counts, cold=cold, baseline=baseline, repeat=repeat)
    print("\n".join(table(result)))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
