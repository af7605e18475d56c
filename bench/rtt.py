# SPDX-License-Identifier: GPL-2.0-or-later
"""Round trip per message, throughput over 100,000 sockets, and the helpers' peak RSS.

Round trip: the server sends one request (command byte + N descriptors) and
waits for the echo; timed from before sendmsg() to after recv() returns.
Every helper is started afresh for each N and switches its own N sockets;
the helpers and the in-process reference (this process setting TCP_REPAIR
itself, no helper, no descriptor passing) take turns message by message, in
an order that rotates every round, so load from other processes falls on
all of them alike.
"""

from __future__ import annotations

import array
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    OFF,
    ON,
    REFERENCE,
    SCM_MAX_FD,
    SOL_TCP,
    TCP_REPAIR,
    Attached,
    HelperKind,
    TcpPool,
    block_ratios,
    deadline,
    log,
    summary_us,
)

INPROC = "inproc"
COMMANDS = {"on": ON, "off": OFF}
BLOCKS = 5

Ancillary = list[tuple[int, int, bytes]]


def _ancillary(fds: Sequence[int]) -> Ancillary:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


class WrongReply(Exception):
    pass


def _request(conn: socket.socket, command: bytes, ancillary: Ancillary, reply: bytearray) -> int:
    """One request and its echo; the time in nanoseconds."""
    start = time.perf_counter_ns()
    conn.sendmsg([command], ancillary)
    got = conn.recv_into(reply)
    elapsed = time.perf_counter_ns() - start
    if got != 1 or reply[0] != command[0]:
        raise WrongReply(f"reply {bytes(reply[:got])!r} to {command!r}")
    return elapsed


def _in_process(socks: Sequence[socket.socket], value: int) -> int:
    """The server switching its own sockets: the floor without a helper."""
    start = time.perf_counter_ns()
    for s in socks:
        s.setsockopt(SOL_TCP, TCP_REPAIR, value)
    return time.perf_counter_ns() - start


def _cpu_ns(pid: int) -> int:
    """CPU time the process has run so far, in nanoseconds (schedstat: exact, unlike the tick counts of stat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _reset(pool: TcpPool) -> None:
    """Repair off (no window probe) on every pool socket, so closing them sends FIN as usual."""
    for s in pool.clients:
        s.setsockopt(SOL_TCP, TCP_REPAIR, -1)


def measure_rtt(kinds: Sequence[HelperKind], counts: Sequence[int], rounds: dict[int, int]) -> dict[str, Any]:
    """Round-trip times per N, per command, per helper (and in-process), in microseconds.

    Returns {"N": {"on"|"off": {key: summary, "ratio": {key: {"median": x, "blocks": [...]}}},
    "helper_cpu_us": {key: CPU time per message}}}, ratios to the C reference (key REFERENCE): ratio
    of medians, and the same per block of rounds.
    """
    result: dict[str, Any] = {}
    keys = [k.key for k in kinds] + [INPROC]
    with tempfile.TemporaryDirectory(prefix="bench-rtt-") as tmp:
        for n in counts:
            total = rounds[n]
            warmup = max(10, total // 20)
            log(f"round trip, N = {n}: {total} rounds of {len(keys)} x 2 messages")
            pool = TcpPool(n * len(keys))
            slices = {key: pool.fds[i * n : (i + 1) * n] for i, key in enumerate(keys)}
            helpers: list[Attached] = []
            try:
                for kind in kinds:
                    helpers.append(Attached(kind, Path(tmp)))
                own = pool.clients[len(kinds) * n :]
                ancillary = {h.kind.key: _ancillary(slices[h.kind.key]) for h in helpers}
                conns = {h.kind.key: h.conn for h in helpers}
                samples: dict[str, dict[str, list[int]]] = {c: {k: [] for k in keys} for c in COMMANDS}
                reply = bytearray(16)
                cpu: dict[str, int] = {}
                with deadline(600, f"round trip N={n}"):
                    for r in range(warmup + total):
                        if r == warmup:
                            cpu = {h.kind.key: -_cpu_ns(h.pid) for h in helpers}
                        for cname, command in COMMANDS.items():
                            for i in range(len(keys)):
                                key = keys[(r + i) % len(keys)]
                                if key == INPROC:
                                    elapsed = _in_process(own, command[0])
                                else:
                                    elapsed = _request(conns[key], command, ancillary[key], reply)
                                if r >= warmup:
                                    samples[cname][key].append(elapsed)
                for h in helpers:
                    cpu[h.kind.key] += _cpu_ns(h.pid)
                for key in keys:
                    if pool.states(slices[key]) != [0] * n:
                        raise RuntimeError(f"{key}: sockets not back in state OFF after the last request")
            finally:
                for h in helpers:
                    h.close()
                _reset(pool)
                pool.close()
            per_n: dict[str, Any] = {}
            for cname in COMMANDS:
                entry: dict[str, Any] = {key: summary_us(samples[cname][key]) for key in keys}
                if REFERENCE in keys:
                    entry["ratio"] = {
                        key: {
                            "median": entry[key]["median"] / entry[REFERENCE]["median"],
                            "blocks": block_ratios(samples[cname][key], samples[cname][REFERENCE], BLOCKS),
                        }
                        for key in keys
                        if key != REFERENCE
                    }
                per_n[cname] = entry
            per_n["helper_cpu_us"] = {key: ns / 1000 / (2 * total) for key, ns in cpu.items()}
            result[str(n)] = per_n
    return result


def measure_throughput(kinds: Sequence[HelperKind], total: int, pool_per_kind: int) -> dict[str, Any]:
    """Sockets switched per second over `total` sockets in full batches, and each helper's peak RSS.

    Each helper (and the in-process reference) cycles through its own pool
    of `pool_per_kind` sockets, ON then OFF, in messages of 253; the
    messages of all of them are interleaved. A fresh helper is started for
    this, so its VmHWM afterwards is the peak of exactly this run.
    """
    keys = [k.key for k in kinds] + [INPROC]
    log(f"throughput: {total} sockets each, pools of {pool_per_kind}")
    pool = TcpPool(pool_per_kind * len(keys))
    slices = {key: pool.fds[i * pool_per_kind : (i + 1) * pool_per_kind] for i, key in enumerate(keys)}
    plan: list[tuple[bytes, int, int]] = []  # command, offset in the pool, count
    done, offset, command = 0, 0, ON
    while done < total:
        count = min(SCM_MAX_FD, total - done, pool_per_kind - offset)
        plan.append((command, offset, count))
        done += count
        offset += count
        if offset == pool_per_kind:
            offset, command = 0, (OFF if command == ON else ON)
    elapsed = dict.fromkeys(keys, 0)
    rss: dict[str, dict[str, int]] = {}
    helpers: list[Attached] = []
    with tempfile.TemporaryDirectory(prefix="bench-tput-") as tmp:
        try:
            for kind in kinds:
                h = Attached(kind, Path(tmp))
                helpers.append(h)
                rss[kind.key] = {"connected": h.peak_rss()}
            by_key = {h.kind.key: h for h in helpers}
            own = pool.clients[len(kinds) * pool_per_kind :]
            ancillary = {key: {(o, c): _ancillary(slices[key][o : o + c]) for _, o, c in plan} for key in by_key}
            reply = bytearray(16)
            with deadline(600, "throughput"):
                for r, (command, o, c) in enumerate(plan):
                    for i in range(len(keys)):
                        key = keys[(r + i) % len(keys)]
                        if key == INPROC:
                            elapsed[key] += _in_process(own[o : o + c], command[0])
                        else:
                            elapsed[key] += _request(by_key[key].conn, command, ancillary[key][(o, c)], reply)
            for h in helpers:
                rss[h.kind.key]["peak"] = h.peak_rss()
        finally:
            for h in helpers:
                h.close()
            _reset(pool)
            pool.close()
    return {
        "sockets": total,
        "messages": len(plan),
        "per_second": {key: total / (elapsed[key] / 1e9) for key in keys},
        "seconds": {key: elapsed[key] / 1e9 for key in keys},
        "rss": rss,
    }
