# SPDX-License-Identifier: GPL-2.0-or-later
"""Long run: 1,000,000 socket switches through one passt-repair, watching its descriptors and memory.

The server is the library's RepairServer; the helper is the installed
passt-repair, started once. 253 connected TCP sockets are switched ON and
OFF in batches of 253 (one message each); every 16th round instead goes
through 16 messages of a single socket. After a warm-up, the helper's
descriptor count (/proc/PID/fd) and VmRSS (/proc/PID/status) are sampled
every 50,000 switches.

Pass: the descriptor count never moves, and VmRSS grows by at most 1 MiB
from the first sample after warm-up to the last. Prints the figures and
exits 0 on pass, 1 on fail.

    .venv/bin/python bench/long_run.py [--switches N]   (as root)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from passt_repair.protocol import SCM_MAX_FD, Command
from passt_repair.server import RepairServer, repair_state

HELPER = Path(sys.executable).with_name("passt-repair")
WARM_UP = 10_000
SAMPLE_EVERY = 50_000
RSS_GROWTH_LIMIT_KIB = 1024
SINGLES_EVERY = 16  # every 16th round goes one socket per message


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connected_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=n)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(n)]
    peers = [listener.accept()[0] for _ in range(n)]
    listener.close()
    return clients, peers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=1_000_000)
    args = parser.parse_args()

    socks, peers = connected_pairs(SCM_MAX_FD)
    # OFF alternates with OFF_NO_WP, so half the rounds also send the peer a window probe.
    offs = [Command.OFF, Command.OFF_NO_WP]
    samples: list[tuple[int, float, int, int]] = []  # switches, seconds, fds, VmRSS KiB
    with tempfile.TemporaryDirectory() as tmp, RepairServer(Path(tmp) / "long.repair", reply_timeout=30) as server:
        helper = subprocess.Popen([str(HELPER), server.path], stderr=subprocess.PIPE)
        info = server.accept(timeout=30)
        at_start = (fd_count(info.pid), vm_rss_kib(info.pid))
        switches = messages = singles = rounds = 0
        next_sample = WARM_UP
        started = time.perf_counter()
        while switches < args.switches:
            for command in (Command.ON, offs[rounds % 2]):
                if rounds % SINGLES_EVERY == SINGLES_EVERY - 1:
                    for s in socks[:16]:
                        server.switch([s], command)
                    switches += 16
                    messages += 16
                    singles += 16
                else:
                    server.switch(socks, command)
                    switches += len(socks)
                    messages += 1
            rounds += 1
            if switches >= next_sample:
                samples.append((switches, time.perf_counter() - started, fd_count(info.pid), vm_rss_kib(info.pid)))
                next_sample += SAMPLE_EVERY
        elapsed = time.perf_counter() - started
        samples.append((switches, elapsed, fd_count(info.pid), vm_rss_kib(info.pid)))
        all_off = not any(repair_state(s) for s in socks)
        server.detach()
        _, err = helper.communicate(timeout=30)
    for s in socks + peers:
        s.close()

    print(f"helper pid {info.pid}: {switches:,} switches in {messages:,} messages, {elapsed:.1f} s")
    print(f"  {singles:,} of those messages carried one socket, the others {SCM_MAX_FD}")
    print(f"  {switches / elapsed:,.0f} switches/s, {messages / elapsed:,.0f} messages/s")
    print(f"  {'switches':>10} {'seconds':>8} {'fds':>4} {'VmRSS KiB':>10}")
    print(f"  {0:>10} {0:>8.1f} {at_start[0]:>4} {at_start[1]:>10,}   (attached, before warm-up)")
    for count, seconds, fds, rss in samples:
        print(f"  {count:>10,} {seconds:>8.1f} {fds:>4} {rss:>10,}")
    fds_seen = {fds for _, _, fds, _ in samples}
    growth = samples[-1][3] - samples[0][3]
    peak = max(rss for *_, rss in samples) - samples[0][3]
    print(f"descriptor counts seen: {sorted(fds_seen)}")
    print(f"VmRSS after warm-up: {samples[0][3]:,} KiB; growth to the end {growth:+,} KiB (peak {peak:+,} KiB)")
    print(f"helper exit status {helper.returncode}; stderr lines {len(err.splitlines())}; all sockets off: {all_off}")
    passed = len(fds_seen) == 1 and growth <= RSS_GROWTH_LIMIT_KIB and helper.returncode == 0 and all_off
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
