# SPDX-License-Identifier: GPL-2.0-or-later
"""Start-up to connected, exit after the server closes, peak RSS, and directory mode (listen() to accept()).

Start-up: from just before the server spawns the helper (fork + exec of the
program) to the server's accept() returning; the server listens already. Each
helper is started both on the socket (socket mode) and on a directory that
holds the socket already (directory mode, socket there). The bare interpreter,
`python -I -S -c pass`, is timed from spawn to exit.

Exit: a shipped helper then gets one request (OFF_NO_WP on one TCP socket, which
changes nothing) and replies; timed from the server's close() to the helper's
exit as waitpid() reports it; its peak RSS (VmHWM) is read just before the close.

Directory mode: the helper is started on an empty directory and left until
it sleeps in its inotify wait; then the server binds a new *.repair socket
there and calls listen(); timed from just before listen() (and, for the
record, from before bind()) to accept() returning.

All programs take turns, in an order that rotates every round.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import REFERENCE, HelperKind, Timeout, block_ratios, log, spawn, summary_us, wait_readable

BLOCKS = 5
#: The request after start-up: TCP_REPAIR_OFF_NO_WP on a socket not in repair mode changes nothing.
_REQUEST = b"\xff"
#: Start-up keys of the directory-mode runs: the helper's key with this suffix.
IN_DIRECTORY = "_dir"


def _finish(proc: subprocess.Popen[bytes], what: str) -> None:
    try:
        status = proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise Timeout(f"{what} did not exit") from None
    if status != 0:
        raise RuntimeError(f"{what} exited {status}")


def _reap(proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait for `proc` (waitpid at once: the exit is timed); raise unless it exits 0."""
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}")


def _peak_rss_kib(pid: int) -> int:
    """VmHWM (the peak RSS since exec; wait4's ru_maxrss would count the forked server's too)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise KeyError("VmHWM")


class _Switched:
    """One connected loopback TCP pair whose client end the request after start-up carries."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(self._listener.getsockname())
        self._peer, _ = self._listener.accept()
        self.ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.client.fileno()]).tobytes())]

    def close(self) -> None:
        for s in (self.client, self._peer, self._listener):
            s.close()


def _start_once(
    kind: HelperKind, workdir: Path, in_directory: bool = False, switched: _Switched | None = None
) -> tuple[int, int | None, int]:
    """Spawn -> accept() in ns; with `switched`, one request, then close() -> exit in ns; peak RSS in KiB."""
    directory = workdir / f"{kind.key}{IN_DIRECTORY if in_directory else ''}"
    directory.mkdir(exist_ok=True)
    path = directory / "s.repair"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        start = time.perf_counter_ns()
        proc = spawn([*kind.argv, str(directory if in_directory else path)])
        try:
            wait_readable(listener, 20, f"{kind.label} start")
            conn, _ = listener.accept()
            elapsed = time.perf_counter_ns() - start
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    path.unlink()
    exit_ns = None
    try:
        if switched is not None:
            conn.sendmsg([_REQUEST], switched.ancillary)
            wait_readable(conn, 20, f"{kind.label} reply")
            if conn.recv(1) != _REQUEST:
                raise RuntimeError(f"{kind.label}: wrong reply")
            rss = _peak_rss_kib(proc.pid)
            closed = time.perf_counter_ns()
            conn.close()
            _reap(proc, kind.label)
            exit_ns = time.perf_counter_ns() - closed
        else:
            rss = _peak_rss_kib(proc.pid)
            conn.close()
            _reap(proc, kind.label)
    except BaseException:
        conn.close()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        raise
    return elapsed, exit_ns, rss


def _bare_once(argv: Sequence[str]) -> int:
    start = time.perf_counter_ns()
    proc = spawn(argv)
    _reap(proc, " ".join(argv))
    return time.perf_counter_ns() - start


def _bare_rss_kib(argv: Sequence[str]) -> int:
    """The bare interpreter's own VmHWM, printed by itself at the end (untimed)."""
    probe = [*argv[:-1], "import sys; sys.stdout.write(open('/proc/self/status').read())"]
    out = subprocess.run(probe, capture_output=True, text=True, check=True).stdout
    return int(next(line for line in out.splitlines() if line.startswith("VmHWM:")).split()[1])


def _p99_ms(samples_ns: Sequence[int]) -> float:
    ordered = sorted(samples_ns)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] / 1e6


def measure_startup(kinds: Sequence[HelperKind], bare: Sequence[str], rounds: int) -> dict[str, Any]:
    """Start-up times in microseconds, ratios to the bare interpreter (key "bare") and p99 in ms, for each
    kind in socket mode (its key) and, for the shipped Python helper, in directory mode ("python_dir");
    exit times of the shipped helpers; peak RSS of all."""
    runs: list[tuple[str, HelperKind | None, bool]] = [("bare", None, False)]
    for k in kinds:
        runs.append((k.key, k, False))
        if k.key == "python":  # the C reference, like upstream's helper, never looks for a socket already there
            runs.append((k.key + IN_DIRECTORY, k, True))
    samples: dict[str, list[int]] = {key: [] for key, _, _ in runs}
    exits: dict[str, list[int]] = {}
    rss: dict[str, list[int]] = {key: [] for key, _, _ in runs}
    warmup = 3
    log(f"start-up: {rounds} rounds of {len(runs)} programs")
    switched = _Switched()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
            for r in range(warmup + rounds):
                for i in range(len(runs)):
                    key, kind, in_directory = runs[(r + i) % len(runs)]
                    if kind is None:
                        elapsed, exit_ns, peak = _bare_once(bare), None, 0
                    else:
                        request = switched if not kind.experiment else None
                        elapsed, exit_ns, peak = _start_once(kind, Path(tmp), in_directory, request)
                    if r >= warmup:
                        samples[key].append(elapsed)
                        rss[key].append(peak)
                        if exit_ns is not None:
                            exits.setdefault(key, []).append(exit_ns)
    finally:
        switched.close()
    result: dict[str, Any] = {key: summary_us(samples[key]) for key, _, _ in runs}
    result["ratio_to_bare"] = {
        key: {
            "median": result[key]["median"] / result["bare"]["median"],
            "blocks": block_ratios(samples[key], samples["bare"], BLOCKS),
        }
        for key, _, _ in runs
        if key != "bare"
    }
    result["p99_ms"] = {key: _p99_ms(samples[key]) for key, _, _ in runs}
    result["exit"] = {key: summary_us(values) for key, values in exits.items()}
    result["rss_kib"] = {key: max(values) for key, values in rss.items() if key != "bare"}
    result["rss_kib"]["bare"] = _bare_rss_kib(bare)
    return result


def _inotify_watches(pid: int) -> int:
    count = 0
    for name in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(FileNotFoundError):
            count += Path(f"/proc/{pid}/fdinfo/{name}").read_text().count("inotify wd:")
    return count


def _sleeping(pid: int) -> bool:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0] == "S"


def wait_until_waiting(proc: subprocess.Popen[bytes], what: str, seconds: float = 20) -> None:
    """Until the helper has its inotify watch and sleeps (in its wait for a new entry)."""
    deadline = time.monotonic() + seconds
    settled = 0
    while settled < 3:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} before the server appeared")
        if time.monotonic() > deadline:
            raise Timeout(f"{what} never settled into its inotify wait")
        settled = settled + 1 if _inotify_watches(proc.pid) and _sleeping(proc.pid) else 0
        time.sleep(0.002)


def _directory_once(kind: HelperKind, directory: Path) -> tuple[int, int]:
    directory.mkdir()
    proc = spawn([*kind.argv, str(directory)])
    try:
        wait_until_waiting(proc, kind.label)
        path = directory / "server.repair"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            before_bind = time.perf_counter_ns()
            listener.bind(str(path))
            before_listen = time.perf_counter_ns()
            listener.listen(0)
            wait_readable(listener, 20, f"{kind.label} in directory mode")
            conn, _ = listener.accept()
            done = time.perf_counter_ns()
        conn.close()
        path.unlink()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    _finish(proc, kind.label)
    directory.rmdir()
    return done - before_listen, done - before_bind


def try_start(kind: HelperKind) -> None:
    """One untimed start-up of `kind`; raises if it does not connect and exit 0."""
    with tempfile.TemporaryDirectory(prefix="bench-try-") as tmp:
        _start_once(kind, Path(tmp))


def try_directory(kind: HelperKind) -> None:
    """One untimed directory-mode trial of `kind`; raises if it does not connect and exit 0."""
    with tempfile.TemporaryDirectory(prefix="bench-try-") as tmp:
        _directory_once(kind, Path(tmp) / "try")


def measure_directory(kinds: Sequence[HelperKind], rounds: int) -> dict[str, Any]:
    """Directory mode, listen() to accept() (and bind() to accept()), in microseconds; ratios to the C reference."""
    keys = [k.key for k in kinds]
    by_key = {k.key: k for k in kinds}
    listen: dict[str, list[int]] = {key: [] for key in keys}
    bind: dict[str, list[int]] = {key: [] for key in keys}
    warmup = 2
    log(f"directory mode: {rounds} rounds of {len(keys)} helpers")
    with tempfile.TemporaryDirectory(prefix="bench-dir-") as tmp:
        for r in range(warmup + rounds):
            for i in range(len(keys)):
                key = keys[(r + i) % len(keys)]
                from_listen, from_bind = _directory_once(by_key[key], Path(tmp) / f"{key}-{r}")
                if r >= warmup:
                    listen[key].append(from_listen)
                    bind[key].append(from_bind)
    reference = REFERENCE
    return {
        "listen_to_accept": {key: summary_us(listen[key]) for key in keys},
        "bind_to_accept": {key: summary_us(bind[key]) for key in keys},
        "ratio": {
            key: {
                "median": statistics_ratio(listen[key], listen[reference]),
                "blocks": block_ratios(listen[key], listen[reference], BLOCKS),
            }
            for key in keys
            if key != reference
        },
    }


def statistics_ratio(numer: Sequence[int], denom: Sequence[int]) -> float:
    return summary_us(numer)["median"] / summary_us(denom)["median"]
