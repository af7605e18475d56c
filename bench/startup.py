"""Start-up to connected, and directory mode (listen() to accept()).

Start-up: from just before the server spawns the helper (fork + exec of the
program) to the server's accept() returning; the server listens already.
The bare interpreter, `python -I -S -c pass`, is timed from spawn to exit.

Directory mode: the helper is started on an empty directory and left until
it sleeps in its inotify wait; then the server binds a new *.repair socket
there and calls listen(); timed from just before listen() (and, for the
record, from before bind()) to accept() returning.

All programs take turns, in an order that rotates every round.
"""

from __future__ import annotations

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


def _finish(proc: subprocess.Popen[bytes], what: str) -> None:
    try:
        status = proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise Timeout(f"{what} did not exit") from None
    if status != 0:
        raise RuntimeError(f"{what} exited {status}")


def _start_once(kind: HelperKind, workdir: Path) -> int:
    path = workdir / f"{kind.key}.repair"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        start = time.perf_counter_ns()
        proc = spawn([*kind.argv, str(path)])
        try:
            wait_readable(listener, 20, f"{kind.label} start")
            conn, _ = listener.accept()
            elapsed = time.perf_counter_ns() - start
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    path.unlink()
    conn.close()
    _finish(proc, kind.label)
    return elapsed


def _bare_once(argv: Sequence[str]) -> int:
    start = time.perf_counter_ns()
    proc = spawn(argv)
    proc.wait()
    elapsed = time.perf_counter_ns() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}")
    return elapsed


def measure_startup(kinds: Sequence[HelperKind], bare: Sequence[str], rounds: int) -> dict[str, Any]:
    """Start-up times in microseconds; ratios to the bare interpreter (key "bare")."""
    keys = ["bare", *(k.key for k in kinds)]
    by_key = {k.key: k for k in kinds}
    samples: dict[str, list[int]] = {key: [] for key in keys}
    warmup = 3
    log(f"start-up: {rounds} rounds of {len(keys)} programs")
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        for r in range(warmup + rounds):
            for i in range(len(keys)):
                key = keys[(r + i) % len(keys)]
                elapsed = _bare_once(bare) if key == "bare" else _start_once(by_key[key], Path(tmp))
                if r >= warmup:
                    samples[key].append(elapsed)
    result: dict[str, Any] = {key: summary_us(samples[key]) for key in keys}
    result["ratio_to_bare"] = {
        key: {
            "median": result[key]["median"] / result["bare"]["median"],
            "blocks": block_ratios(samples[key], samples["bare"], BLOCKS),
        }
        for key in keys
        if key != "bare"
    }
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
