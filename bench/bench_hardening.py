"""What confinement costs the helper: at start-up, per message, per system call.

Three measurements, each comparing with and without hardening in one run
(the machine is shared: only the ratios mean something, and medians of
interleaved repetitions are used):

1. Start-up to the first reply, and the time per message afterwards: the real
   `passt-repair` command (lock_down, capability drops, seccomp) against the same
   imports and `helper.run` without any of it.
2. Each confinement step alone, in a child process (the filter cannot be removed).
3. The filter's cost per system call: getsockopt (an allowed call with no argument
   test, which the kernel answers from its per-filter cache) and setsockopt (whose
   arguments are tested, so the program runs every time), before and after install.

    .venv/bin/python bench/bench_hardening.py [--quick]
"""

from __future__ import annotations

import array
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HELPER = str(Path(sys.executable).with_name("passt-repair"))
#: As deployed: compiled modules cached (this machine's environment turns that off; `python -I` ignores it).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
#: What the console script imports (re, cli), then the helper's connect and serve with no confinement.
UNHARDENED = (
    "import re, sys; from passt_repair import cli; from passt_repair.helper import run, stderr_log;"
    " run(sys.argv[1], stderr_log)"
)


def _pairs(n: int) -> tuple[socket.socket, list[socket.socket], list[socket.socket]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    clients, peers = [], []
    for _ in range(n):
        clients.append(socket.create_connection(listener.getsockname()))
        peers.append(listener.accept()[0])
    return listener, clients, peers


def _request(conn: socket.socket, command: int, fds: Sequence[int]) -> None:
    conn.sendmsg(
        [(command & 0xFF).to_bytes(1, "little")],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
    )
    if conn.recv(1) != (command & 0xFF).to_bytes(1, "little"):
        raise RuntimeError("helper did not echo")


def session(argv: list[str], directory: Path, fds: list[int], small: int, full: int) -> dict[str, float]:
    """Start a helper, time the first reply, then `small` 1-socket and `full` 253-socket round trips."""
    path = directory / "bench.repair"
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    started = time.perf_counter()
    proc = subprocess.Popen([*argv, str(path)], stderr=subprocess.PIPE, env=ENV)
    conn, _ = listener.accept()
    _request(conn, 1, fds[:1])
    first_reply = time.perf_counter() - started
    t = time.perf_counter()
    for i in range(small):
        _request(conn, 1 if i % 2 else -1, fds[:1])
    per_small = (time.perf_counter() - t) / small
    t = time.perf_counter()
    for i in range(full):
        _request(conn, 1 if i % 2 else -1, fds[:253])
    per_full = (time.perf_counter() - t) / full
    conn.close()
    listener.close()
    _, err = proc.communicate(timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"helper exited {proc.returncode}: {err.decode()}")
    return {"first reply": first_reply, "1-socket message": per_small, "253-socket message": per_full}


STEPS = r"""
import json, os, socket, sys, time
clock = time.perf_counter
t0 = clock()
from passt_repair import hardening, helper
t1 = clock()
hardening.lock_down()
t2 = clock()
helper.check_start(False)
t3 = clock()
seccomp = hardening.seccomp_filter(False)
t4 = clock()
hardening.drop_for_connect()
t5 = clock()
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen()
client = socket.create_connection(listener.getsockname()); peer, _ = listener.accept()
rounds = int(sys.argv[1])

def per_call():
    t = clock()
    for _ in range(rounds):
        client.getsockopt(6, 19)
    get = (clock() - t) / rounds
    t = clock()
    for i in range(rounds):
        client.setsockopt(6, 19, 1 if i % 2 else -1)
    return get, (clock() - t) / rounds

before = per_call()
t6 = clock()
hardening.confine(seccomp)
t7 = clock()
after = per_call()
report = {
    "import hardening (ctypes)": t1 - t0, "lock_down": t2 - t1, "check_start (/proc/self/status)": t3 - t2,
    "seccomp_filter (assemble)": t4 - t3, "drop_for_connect": t5 - t4, "confine (capset + install)": t7 - t6,
    "getsockopt before": before[0], "getsockopt after": after[0],
    "setsockopt before": before[1], "setsockopt after": after[1],
}
os.write(1, json.dumps(report).encode())
client.close(); peer.close(); listener.close()
"""


def steps(rounds: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", STEPS, str(rounds)], capture_output=True, check=True, env=ENV).stdout
    result: dict[str, float] = json.loads(out)
    return result


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:10.1f} us"


def main() -> int:
    quick = "--quick" in sys.argv
    repetitions, small, full, rounds = (3, 200, 20, 2000) if quick else (15, 2000, 200, 20000)
    listener, clients, peers = _pairs(253)
    fds = [c.fileno() for c in clients]
    runs: dict[str, list[dict[str, float]]] = {"unhardened": [], "hardened": []}
    with tempfile.TemporaryDirectory() as tmp:
        for argv in ([sys.executable, "-c", UNHARDENED], [HELPER]):  # warm-up: writes the bytecode caches
            session(argv, Path(tmp), fds, 1, 1)
        for _ in range(repetitions):  # interleaved, so load changes hit both alike
            runs["unhardened"].append(session([sys.executable, "-c", UNHARDENED], Path(tmp), fds, small, full))
            runs["hardened"].append(session([HELPER], Path(tmp), fds, small, full))
    print(f"helper sessions: {repetitions} of each, medians; {small} 1-socket and {full} 253-socket messages each")
    print(f"{'':<22}{'unhardened':>14}{'hardened':>14}{'ratio':>8}")
    for key in ("first reply", "1-socket message", "253-socket message"):
        plain = statistics.median(r[key] for r in runs["unhardened"])
        hard = statistics.median(r[key] for r in runs["hardened"])
        print(f"{key:<22}{_us(plain)}{_us(hard)}{hard / plain:8.2f}")

    step_runs = [steps(rounds) for _ in range(repetitions)]
    print(f"\nconfinement steps in a child process ({repetitions} runs, medians):")
    for key in list(step_runs[0])[:6]:
        print(f"  {key:<30}{_us(statistics.median(r[key] for r in step_runs))}")
    print(f"\nper system call, {rounds} calls, before and after the filter:")
    for call in ("getsockopt", "setsockopt"):
        before = statistics.median(r[f"{call} before"] for r in step_runs)
        after = statistics.median(r[f"{call} after"] for r in step_runs)
        print(f"  {call}(TCP_REPAIR) {_us(before)} -> {_us(after)}  ratio {after / before:.3f}")
    for s in clients + peers:
        s.close()
    listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
