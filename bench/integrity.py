# SPDX-License-Identifier: GPL-2.0-or-later
"""`python -m bench.integrity`: what the wire format's integrity check costs, side by side in one run.

Per MiB: copying the bytes once (the floor any reader pays), zlib.crc32 (the
check the format uses) and the hashlib digests it could have used instead;
then encode and decode of 1,000 records carrying 80 KiB of queues each
(64 KiB sent, 16 KiB received, as in bench_migration), with the share of
their time that is the CRC. Each figure is the best of several rounds, taken
in alternation, so a busy machine slows them alike; ratios are what to read.
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from collections.abc import Callable

from passt_repair.tcp import ConnectionState, RepairWindow, TcpState, decode, encode

ROUNDS = 7
MIB = 1 << 20
CONNECTIONS = 1000


def _record(i: int, sent: bytes, received: bytes) -> ConnectionState:
    return ConnectionState(
        local=("198.18.0.100", 5000),
        remote=("198.18.0.1", 10000 + i),
        state=TcpState.ESTABLISHED,
        snd_seq=i * 7919,
        rcv_seq=i * 104729,
        mss=1448,
        window_scaling=True,
        snd_wscale=7,
        rcv_wscale=7,
        sack=True,
        timestamp=123456,
        window=RepairWindow(i * 104729, 65535, 65535, 65535, i * 104729),
        sent=sent,
        received=received,
    )


def best(rounds: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The best time of each, in seconds, run in alternation."""
    times = {name: float("inf") for name in rounds}
    for _ in range(ROUNDS):
        for name, run in rounds.items():
            start = time.perf_counter()
            run()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def main() -> None:
    block = os.urandom(64 * MIB)
    digests: dict[str, Callable[[], object]] = {
        "copy (bytes())": lambda: bytes(memoryview(block)),
        "zlib.crc32": lambda: zlib.crc32(block),
        "hashlib.sha256": lambda: hashlib.sha256(block).digest(),
        "hashlib.sha1": lambda: hashlib.sha1(block).digest(),  # noqa: S324 - a checksum here, not security
        "hashlib.blake2b-128": lambda: hashlib.blake2b(block, digest_size=16).digest(),
        "hashlib.md5": lambda: hashlib.md5(block).digest(),  # noqa: S324 - a checksum here, not security
    }
    times = best(digests)
    floor = times["copy (bytes())"]
    print("integrity check, per MiB (measured side by side in one run)")
    print(f"{'':22} {'us/MiB':>8} {'/ copy':>7}")
    for name, seconds in times.items():
        print(f"{name:22} {seconds * 1e6 / 64:8.0f} {seconds / floor:7.2f}")

    sent, received = os.urandom(64 << 10), os.urandom(16 << 10)
    states = [_record(i, sent, received) for i in range(CONNECTIONS)]
    data = encode(states)
    mib = len(data) / MIB
    stream = best(
        {
            "encode": lambda: encode(states),
            "decode(copy=False)": lambda: decode(data, copy=False),
            "crc32 of the stream": lambda: zlib.crc32(data),
        }
    )
    crc = stream["crc32 of the stream"]
    print(f"\n{CONNECTIONS:,} records, {mib:.1f} MiB")
    print(f"{'':22} {'ms':>8} {'CRC share':>10}")
    for name in ("encode", "decode(copy=False)"):
        print(f"{name:22} {stream[name] * 1e3:8.1f} {crc / stream[name]:10.0%}")
    print(f"{'crc32 of the stream':22} {crc * 1e3:8.1f}")


if __name__ == "__main__":
    main()
