# SPDX-License-Identifier: GPL-2.0-or-later
"""What the server library adds to a round trip: RepairServer and AsyncRepairServer against bare socket calls.

Three C reference helpers (the cheapest other end, so the server's own work
shows) each switch their own N sockets: one driven by bare sendmsg() and
recv() as in the round-trip rows, one by `RepairServer.switch`, one by
`AsyncRepairServer.switch` awaited in an event loop. They take turns message
by message (ON, then OFF), in an order that rotates every round; all three run
inside one event loop, so the loop's own presence costs the three alike. A
message is timed from the call to its return; the ratio is of the medians.
"""

from __future__ import annotations

import array
import asyncio
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import OFF, ON, Attached, HelperKind, TcpPool, block_ratios, deadline, log, spawn, summary_us
from passt_repair.aio import AsyncRepairServer
from passt_repair.protocol import Command
from passt_repair.server import RepairServer

RAW, BLOCKING, ASYNC = "raw", "blocking", "asyncio"
LABELS = {RAW: "bare socket calls", BLOCKING: "RepairServer", ASYNC: "AsyncRepairServer"}
COMMANDS = {"on": (ON, Command.ON), "off": (OFF, Command.OFF)}
BLOCKS = 5


def measure(ref: Path, counts: Sequence[int], rounds: dict[int, int]) -> dict[str, Any]:
    """Per N and command: each way's summary (us) and the fronts' ratios to the bare calls."""
    return asyncio.run(_measure(ref, counts, rounds))


async def _measure(ref: Path, counts: Sequence[int], rounds: dict[int, int]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fronts-") as tmp:
        for n in counts:
            total, warmup = rounds[n], max(10, rounds[n] // 20)
            log(f"server library, N = {n}: {total} rounds of 3 x 2 messages")
            pool = TcpPool(3 * n)
            fds = {key: pool.fds[i * n : (i + 1) * n] for i, key in enumerate((RAW, BLOCKING, ASYNC))}
            raw = Attached(HelperKind("c", "C reference", (str(ref),), exact=False), Path(tmp))
            blocking = RepairServer(Path(tmp) / f"blocking-{n}.repair", reply_timeout=20)
            asynchronous = AsyncRepairServer(Path(tmp) / f"async-{n}.repair", reply_timeout=20)
            procs = [spawn([str(ref), blocking.path]), spawn([str(ref), asynchronous.path])]
            samples: dict[str, dict[str, list[int]]] = {c: {k: [] for k in LABELS} for c in COMMANDS}
            try:
                blocking.accept(timeout=20)
                await asynchronous.accept(timeout=20)
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds[RAW]).tobytes())]
                reply = bytearray(16)
                keys = list(LABELS)
                with deadline(600, f"server library N={n}"):
                    for r in range(warmup + total):
                        for cname, (byte, command) in COMMANDS.items():
                            for i in range(len(keys)):
                                key = keys[(r + i) % len(keys)]
                                start = time.perf_counter_ns()
                                if key == RAW:
                                    raw.conn.sendmsg([byte], ancillary)
                                    if raw.conn.recv_into(reply) != 1 or reply[0] != byte[0]:
                                        raise RuntimeError(f"C reference replied {bytes(reply)!r} to {byte!r}")
                                elif key == BLOCKING:
                                    blocking.switch(fds[BLOCKING], command)
                                else:
                                    await asynchronous.switch(fds[ASYNC], command)
                                elapsed = time.perf_counter_ns() - start
                                if r >= warmup:
                                    samples[cname][key].append(elapsed)
                if pool.states(pool.fds) != [0] * (3 * n):
                    raise RuntimeError("sockets not back in state OFF after the last request")
            finally:
                raw.close()
                blocking.close()
                asynchronous.close()
                for proc in procs:
                    proc.wait(20)
                pool.close()
            per_n: dict[str, Any] = {}
            for cname in COMMANDS:
                entry: dict[str, Any] = {key: summary_us(samples[cname][key]) for key in LABELS}
                entry["ratio"] = {
                    key: {
                        "median": entry[key]["median"] / entry[RAW]["median"],
                        "blocks": block_ratios(samples[cname][key], samples[cname][RAW], BLOCKS),
                    }
                    for key in (BLOCKING, ASYNC)
                }
                per_n[cname] = entry
            result[str(n)] = per_n
    return result


def table(figures: dict[str, Any]) -> list[str]:
    """The rows of the results block: median us (p25-p75) per way, and the fronts' ratios to bare calls."""

    def spread(blocks: Sequence[float]) -> str:
        return f"{min(blocks):.2f}-{max(blocks):.2f}" if blocks else "-"

    lines = [
        "Server library (bench/fronts.py): one message through each front against bare sendmsg()/recv(),",
        "each to its own C reference helper, taking turns; median us (p25-p75), ratio of medians (block range):",
        "",
        "| N | cmd | " + " | ".join(LABELS.values()) + " | RepairServer / bare | AsyncRepairServer / bare |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n, per_n in figures.items():
        for cname in COMMANDS:
            e = per_n[cname]
            cells = [f"{e[k]['median']:.1f} ({e[k]['p25']:.0f}-{e[k]['p75']:.0f})" for k in LABELS]
            ratios = [f"{e['ratio'][k]['median']:.3f} ({spread(e['ratio'][k]['blocks'])})" for k in (BLOCKING, ASYNC)]
            lines.append(f"| {n} | {cname.upper()} | " + " | ".join(cells + ratios) + " |")
    return lines
