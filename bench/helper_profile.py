"""Where the Python helper's time goes: per message, per descriptor, and at start-up.

Four views, all measured here and now:
- the kernel's price per descriptor, from C (bench/syscall_cost.c);
- the same calls made from Python, the shipped way and cheaper ways;
- the shipped helper's request loop cut into its stages (its own functions,
  called in the order serve() calls them, on real descriptors), at N = 1
  (the fixed cost of a message) and N = 253 (the cost per descriptor);
- the whole loop, hot: the shipped serve() against the same loop without the
  prior-state read (bench/variants/noprior.py), each fed the same queued requests;
- and the import time of the installed command (`python -X importtime`).

Everything runs in this process, pinned to the helper CPU, with the caches
warm: these are the costs of the work itself, without the wake-ups the round
trips include. Requests alternate ON and OFF_NO_WP so no window probe is sent.
"""

from __future__ import annotations

import array
import ctypes
import importlib.util
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import repeat
from pathlib import Path
from typing import Any

from bench.common import BENCH, BUILD, HELPER_CPU, SERVER_CPU, SOL_TCP, TCP_REPAIR, TcpPool, log
from passt_repair import helper

SO_SNDBUFFORCE = 32
_COMMAND_CYCLE = (1, -1)


def syscall_costs(rounds: int) -> dict[str, float]:
    """Nanoseconds per descriptor for each system call, from C (compiled now, like the C helper)."""
    BUILD.mkdir(exist_ok=True)
    exe = BUILD / "syscall_cost"
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-o", str(exe), str(BENCH / "syscall_cost.c")], check=True)
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {HELPER_CPU})
    try:
        out = subprocess.run([str(exe), str(rounds)], check=True, capture_output=True, text=True).stdout
    finally:
        os.sched_setaffinity(0, mine)
    costs: dict[str, float] = json.loads(out)
    return costs


def _per_fd(run: Callable[[int], None], fds: int, rounds: int) -> float:
    """Median over rounds of run(round)'s time, per descriptor, in nanoseconds."""
    times = []
    for r in range(rounds):
        start = time.perf_counter_ns()
        run(r)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / fds


def python_call_costs(pool: TcpPool, rounds: int) -> dict[str, float]:
    """Nanoseconds per descriptor for the helper's calls made from Python, several ways."""
    socks = pool.clients
    n = len(socks)
    getsockopt: Callable[..., int] = socket.socket.getsockopt
    setsockopt: Callable[..., None] = socket.socket.setsockopt
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_int(0)
    fds = [s.fileno() for s in socks]

    def read_loop(r: int) -> None:
        [s.getsockopt(SOL_TCP, TCP_REPAIR) for s in socks]

    def read_map(r: int) -> None:
        list(map(getsockopt, socks, repeat(SOL_TCP), repeat(TCP_REPAIR)))

    def set_loop(r: int) -> None:
        v = _COMMAND_CYCLE[r % 2]
        for s in socks:
            s.setsockopt(SOL_TCP, TCP_REPAIR, v)

    def set_map(r: int) -> None:
        any(map(setsockopt, socks, repeat(SOL_TCP), repeat(TCP_REPAIR), repeat(_COMMAND_CYCLE[r % 2])))

    def set_ctypes(r: int) -> None:
        value.value = _COMMAND_CYCLE[r % 2]
        ref = ctypes.byref(value)
        for fd in fds:
            libc.setsockopt(fd, SOL_TCP, TCP_REPAIR, ref, 4)

    costs = {
        "getsockopt, loop (shipped)": _per_fd(read_loop, n, rounds),
        "getsockopt, map()": _per_fd(read_map, n, rounds),
        "setsockopt, loop (shipped)": _per_fd(set_loop, n, rounds * 2),
        "setsockopt, map()": _per_fd(set_map, n, rounds * 2),
        "setsockopt, ctypes loop": _per_fd(set_ctypes, n, rounds * 2),
    }
    close_times, range_times = [], []
    for _ in range(rounds):
        dups = [os.dup(fd) for fd in fds]
        start = time.perf_counter_ns()
        for fd in dups:
            os.close(fd)
        close_times.append(time.perf_counter_ns() - start)
        dups = [os.dup(fd) for fd in fds]
        start = time.perf_counter_ns()
        os.closerange(min(dups), max(dups) + 1)
        range_times.append(time.perf_counter_ns() - start)
    costs["os.close loop"] = statistics.median(close_times) / n
    costs["os.closerange (one close_range)"] = statistics.median(range_times) / n
    for s in socks:
        s.setsockopt(SOL_TCP, TCP_REPAIR, -1)
    return costs


STAGES = (
    "recvmsg_into",
    "parse SCM_RIGHTS (_received)",
    "check request (_VALUES)",
    "socket objects (table.views)",
    "prior state read (getsockopt)",
    "switch (setsockopt)",
    "close (_close)",
    "reply (send)",
)


COLD_BYTES = 16 << 20


def message_stages(pool: TcpPool, count: int, rounds: int, cold: bool = False) -> dict[str, float]:
    """The shipped loop's stages for requests of `count` descriptors: median microseconds per message.

    The stage bodies are the shipped functions; the glue between them is
    serve()'s and _apply()'s, restated here so each stage can be timed
    (keep in step with src/passt_repair/helper.py). With `cold`, 16 MiB are
    written before each request (untimed), as other work would between two
    requests of a real migration: the caches no longer hold the helper's code
    and data. syscall_cost.c does the same for the C step.
    """
    junk = bytearray(COLD_BYTES if cold else 0)
    zeros = bytes(len(junk) // 64)
    fds = pool.fds[:count]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    server, conn = socket.socketpair()
    table = helper._SocketTable()
    buf = bytearray(2)
    clock = time.perf_counter_ns
    samples: list[list[int]] = [[] for _ in STAGES]
    for r in range(rounds + 20):
        server.sendmsg([bytes([_COMMAND_CYCLE[r % 2] & 0xFF])], ancillary)
        if cold:
            junk[::64] = zeros
        t0 = clock()
        nbytes, anc, flags, _ = conn.recvmsg_into([buf], helper._ANC_SPACE)
        t1 = clock()
        got, contiguous, other = helper._received(anc)
        t2 = clock()
        command = helper._VALUES.get(buf[0]) if nbytes == 1 and got and not (flags or other) else None
        assert command is not None
        t3 = clock()
        views = table.views(got, contiguous)
        t4 = clock()
        [view.getsockopt(SOL_TCP, TCP_REPAIR) for view in views]
        t5 = clock()
        for view in views:
            view.setsockopt(SOL_TCP, TCP_REPAIR, command)
        t6 = clock()
        helper._close(got, contiguous)
        t7 = clock()
        conn.send(helper._REPLIES[command])
        t8 = clock()
        server.recv(16)
        if r >= 20:
            marks = (t0, t1, t2, t3, t4, t5, t6, t7, t8)
            for i in range(len(STAGES)):
                samples[i].append(marks[i + 1] - marks[i])
    table.close()
    server.close()
    conn.close()
    for s in pool.clients[:count]:
        s.setsockopt(SOL_TCP, TCP_REPAIR, -1)
    return {name: statistics.median(samples[i]) / 1000 for i, name in enumerate(STAGES)}


def receive_costs(pool: TcpPool, rounds: int) -> dict[str, float]:
    """Microseconds per message to receive a request and parse its descriptors, N = 1 and 253:
    recvmsg_into() (shipped) against recvmsg(), then _received() (array, contiguity check)."""
    out: dict[str, float] = {}
    for count in (1, 253):
        fds = pool.fds[:count]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        server, conn = socket.socketpair()
        buf = bytearray(2)
        times: dict[str, list[int]] = {"recvmsg_into": [], "recvmsg": [], "_received": []}
        for r in range(rounds + 20):
            for how in ("recvmsg_into", "recvmsg"):
                server.sendmsg([b"\x01"], ancillary)
                start = time.perf_counter_ns()
                if how == "recvmsg_into":
                    _, anc, _, _ = conn.recvmsg_into([buf], helper._ANC_SPACE)
                else:
                    _, anc, _, _ = conn.recvmsg(2, helper._ANC_SPACE)
                middle = time.perf_counter_ns()
                got, contiguous, _ = helper._received(anc)
                parsed = time.perf_counter_ns()
                helper._close(got, contiguous)
                if not contiguous:
                    raise RuntimeError("received descriptors are not contiguous")
                if r >= 20:
                    times[how].append(middle - start)
                    times["_received"].append(parsed - middle)
        server.close()
        conn.close()
        for name, values in times.items():
            out[f"{name}, N={count}"] = statistics.median(values) / 1000
    return out


def small_costs(rounds: int) -> dict[str, float]:
    """Nanoseconds for per-message bits of bookkeeping, each alone."""
    stop = helper._StopSignals()
    clock = time.perf_counter_ns
    out: dict[str, float] = {}

    def timed(body: Callable[[], object]) -> float:
        start = clock()
        for _ in range(rounds):
            body()
        return (clock() - start) / rounds

    def flags() -> None:
        try:
            stop.busy = True
        finally:
            stop.busy = False

    def nothing() -> None:
        pass

    empty = timed(nothing)
    out["signal flag: busy=True/False with try/finally"] = timed(flags) - empty
    return out


def _load_variant(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, BENCH / "variants" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def whole_loop(pool: TcpPool, count: int, batch: int, repeats: int) -> dict[str, float]:
    """Microseconds per request through a whole serve() loop, hot: `batch` requests queued, then EOF."""
    noprior = _load_variant("noprior")
    shipped_switch = helper.switch

    def without_prior_read(conn: socket.socket) -> None:
        helper.switch = noprior.switch_without_prior_read
        try:
            helper.serve(conn, lambda message: None)
        finally:
            helper.switch = shipped_switch

    loops: dict[str, Callable[[socket.socket], None]] = {
        "shipped serve()": lambda conn: helper.serve(conn, lambda message: None),
        "without prior read (NOT exact)": without_prior_read,
    }
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", pool.fds[:count]).tobytes())]
    totals = dict.fromkeys(loops, 0)
    for r in range(repeats):
        for name, loop in loops.items():
            server, conn = socket.socketpair()
            server.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
            for i in range(batch):
                server.sendmsg([bytes([_COMMAND_CYCLE[i % 2] & 0xFF])], ancillary)
            server.shutdown(socket.SHUT_WR)
            start = time.perf_counter_ns()
            loop(conn)
            if r:  # the first pass only warms up
                totals[name] += time.perf_counter_ns() - start
            server.close()
            conn.close()
    for s in pool.clients[:count]:
        s.setsockopt(SOL_TCP, TCP_REPAIR, -1)
    return {name: total / 1000 / batch / (repeats - 1) for name, total in totals.items()}


_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_times(argv: list[str], runs: int) -> dict[str, dict[str, float]]:
    """Median self and cumulative import time (us) per module when `argv` (a python -X importtime ...) runs."""
    per_module: dict[str, list[tuple[int, int, int]]] = {}
    for _ in range(runs):
        err = subprocess.run(argv, capture_output=True, text=True).stderr
        for m in _IMPORT_LINE.finditer(err):
            per_module.setdefault(m.group(4), []).append((int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2))
    return {
        name: {
            "self": statistics.median(s for s, _, _ in v),
            "cumulative": statistics.median(c for _, c, _ in v),
            "depth": v[0][2],
        }
        for name, v in per_module.items()
    }


def measure(python: Path, command: Path, quick: bool) -> dict[str, Any]:
    rounds = 100 if quick else 400
    log("profile: system call costs, Python call costs, loop stages, whole loops, imports")
    os.sched_setaffinity(0, {HELPER_CPU})
    pool = TcpPool(253)
    try:
        result: dict[str, Any] = {
            "syscall_ns": syscall_costs(rounds),
            "python_call_ns": python_call_costs(pool, rounds),
            "stages_us": {str(n): message_stages(pool, n, rounds * 5 if n == 1 else rounds) for n in (1, 253)},
            "stages_cold_us": {"1": message_stages(pool, 1, rounds * 2, cold=True)},
            "bookkeeping_ns": small_costs(20_000 if quick else 100_000),
            "receive_us": receive_costs(pool, rounds),
            "whole_loop_us": {
                "1": whole_loop(pool, 1, 200, 6 if quick else 21),
                "253": whole_loop(pool, 253, 30, 3 if quick else 9),
            },
        }
    finally:
        pool.close()
        os.sched_setaffinity(0, {SERVER_CPU})
    runs = 5 if quick else 15
    result["imports_us"] = import_times([str(python), "-X", "importtime", str(command), "/nonexistent/bench"], runs)
    # What modules the helper might come to need at start-up would add to what it imports already
    # (hardening, for prctl or seccomp; annotations).
    already = "import re, passt_repair.cli, passt_repair.helper"
    extra = import_times([str(python), "-X", "importtime", "-c", f"{already}; import ctypes; import typing"], runs)
    result["candidate_imports_us"] = {name: extra[name]["cumulative"] for name in ("ctypes", "typing") if name in extra}
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it through the suite: python -m bench --only profile")
