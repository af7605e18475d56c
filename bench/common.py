# SPDX-License-Identifier: GPL-2.0-or-later
"""What every benchmark needs: the helpers to compare, CPU pinning, TCP sockets, statistics.

The server (this process) runs on one CPU and every helper on the other, so
each helper pays the same cross-CPU wake-up per message. Helpers are started
with the server's affinity switched for the spawn only, so the child starts
pinned without a wrapper process (taskset would add an exec to start-up).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "build"

SERVER_CPU = 0
#: On a single CPU both run on it; the figures then include the context switch instead of a wake-up.
HELPER_CPU = 1 if len(os.sched_getaffinity(0)) > 1 and 1 in os.sched_getaffinity(0) else SERVER_CPU

#: TCP_REPAIR commands as the server sends them, one signed byte each.
ON = b"\x01"
OFF = b"\x00"
#: The key of the C reference helper: ratios are to it.
REFERENCE = "c"
SOL_TCP = 6
TCP_REPAIR = 19
SCM_MAX_FD = 253


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The helpers under test


@dataclass(frozen=True)
class HelperKind:
    """A helper program: `argv` + PATH runs it. `key` names it in the results.

    `exact`: it claims the all-or-nothing guarantee (checked before timing).
    `experiment`: not a shipped program, only a measurement of a possible change.
    """

    key: str
    label: str
    argv: tuple[str, ...]
    exact: bool = True
    experiment: bool = False


def build_c(name: str) -> Path:
    """Compile bench/NAME.c with `cc -O2` into bench/build/NAME (every run: it takes a moment)."""
    BUILD.mkdir(exist_ok=True)
    out = BUILD / name
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(BENCH / f"{name}.c")], check=True)
    return out


def build_ref_helper() -> Path:
    """The C reference helper, bench/ref_helper.c, compiled."""
    return build_c("ref_helper")


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted([ROOT / "pyproject.toml", *(ROOT / "src").rglob("*")]):
        if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(path):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def regular_install() -> Path:
    """A venv in bench/build/venv with the project installed the way users get it: `pip install .`.

    An editable install (the development .venv) puts an import hook in site
    and slows start-up, so start-up is measured here. The venv has no pip or
    setuptools of its own (their .pth files would run at every start) and is
    rebuilt whenever the sources change. Returns the venv's bin directory.
    """
    venv = BUILD / "venv"
    stamp = venv / "source-hash"
    wanted = _source_hash()
    if stamp.exists() and stamp.read_text() == wanted and (venv / "bin" / "passt-repair").exists():
        return venv / "bin"
    log("installing the project into bench/build/venv (pip install .)")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(ROOT),
        ],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    stamp.write_text(wanted)
    return venv / "bin"


# ---------------------------------------------------------------------------
# Processes pinned to a CPU


def pin_self(cpu: int = SERVER_CPU) -> None:
    os.sched_setaffinity(0, {cpu})


def spawn(argv: Sequence[str], stderr: IO[bytes] | int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start `argv` on the helper CPU; the server stays on its own."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {HELPER_CPU})
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    finally:
        os.sched_setaffinity(0, mine)


class Timeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Raise Timeout if the block takes longer than `seconds` (a stuck helper must not hang the run)."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Timeout(f"{what}: no progress within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def wait_readable(sock: socket.socket, seconds: float, what: str) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(seconds * 1000):
        raise Timeout(f"{what}: nothing within {seconds:g} s")


class Attached:
    """A helper process started on a fresh listening socket, connected and ready for requests."""

    def __init__(self, kind: HelperKind, workdir: Path) -> None:
        self.kind = kind
        path = workdir / f"{kind.key}-{time.monotonic_ns()}.repair"
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115 (kept until stop() reads it)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            listener.listen(1)
            self.proc = spawn([*kind.argv, str(path)], stderr=self._errors)
            try:
                wait_readable(listener, 20, f"{kind.label} start")
            except Timeout:
                self.proc.kill()
                raise
            self.conn, _ = listener.accept()
        path.unlink()
        self.pid = self.proc.pid

    def peak_rss(self) -> int:
        """VmHWM of the helper, in bytes."""
        return _status_kib(self.pid, "VmHWM") * 1024

    def stop(self) -> tuple[int, list[str]]:
        """Close the connection, wait for the helper; its exit status and its stderr lines (bar the notice)."""
        self.conn.close()
        try:
            status = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            status = -9
        self._errors.seek(0)
        lines = [
            line for line in self._errors.read().decode(errors="replace").splitlines() if "connected to" not in line
        ]
        self._errors.close()
        return status, lines

    def close(self) -> None:
        """Close the connection; the helper must exit 0 (end of file) and say nothing."""
        status, lines = self.stop()
        if status != 0 or lines:
            raise RuntimeError(f"{self.kind.label} exited {status}: {' | '.join(lines)}")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# ---------------------------------------------------------------------------
# Sockets to switch


class TcpPool:
    """`n` connected loopback TCP pairs; `fds` are the client ends, the sockets that get switched."""

    def __init__(self, n: int) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        address = self._listener.getsockname()
        self._socks: list[socket.socket] = []
        for _ in range(n):
            client = socket.create_connection(address)
            peer, _ = self._listener.accept()
            self._socks += (client, peer)
        self.clients = self._socks[0::2]
        self.fds = [s.fileno() for s in self.clients]

    def states(self, fds: Sequence[int]) -> list[int]:
        by_fd = {s.fileno(): s for s in self.clients}
        return [by_fd[fd].getsockopt(SOL_TCP, TCP_REPAIR) for fd in fds]

    def close(self) -> None:
        for s in self._socks:
            s.close()
        self._listener.close()


# ---------------------------------------------------------------------------
# Statistics


def summary_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """Median and spread of timings in nanoseconds, as microseconds."""
    us = sorted(s / 1000 for s in samples_ns)
    if len(us) < 2:
        return dict.fromkeys(("median", "p25", "p75", "p05", "p95", "min"), us[0]) | {"n": len(us)}
    twentieths = statistics.quantiles(us, n=20, method="inclusive")
    return {
        "median": statistics.median(us),
        "p25": twentieths[4],
        "p75": twentieths[14],
        "p05": twentieths[0],
        "p95": twentieths[18],
        "min": us[0],
        "n": len(us),
    }


def block_ratios(numer: Sequence[int], denom: Sequence[int], blocks: int) -> list[float]:
    """Ratio of medians in each of `blocks` consecutive slices (the samples were taken in turns)."""
    size = max(1, min(len(numer), len(denom)) // blocks)
    out = []
    for b in range(blocks):
        a, d = numer[b * size : (b + 1) * size], denom[b * size : (b + 1) * size]
        if a and d:
            out.append(statistics.median(a) / statistics.median(d))
    return out
