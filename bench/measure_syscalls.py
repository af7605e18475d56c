# SPDX-License-Identifier: GPL-2.0-or-later
"""Which system calls does the helper make once it is confined? Measured, not guessed.

Runs the test suite in-process with a pytest plugin that puts every run of the
installed helper under `strace -f` (and widens the tests' own strace prefixes to
trace everything), then counts, per system call, the calls made after the point
where the seccomp filter goes on: the seccomp() call itself, or on a helper
without one, the SO_PEERCRED read right after connecting. Compares the result
with the allow-list in passt_repair.hardening.

    .venv/bin/python bench/measure_syscalls.py [pytest args, default: tests/test_helper.py tests/test_hardening.py]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

HELPER = str(Path(sys.executable).with_name("passt-repair"))
_CALL = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)(\(| resumed>)")
_MARKERS = ("seccomp(SECCOMP_SET_MODE_FILTER", "prctl(PR_SET_SECCOMP", "SO_PEERCRED")


class StraceEveryHelper:
    """A pytest plugin: every Popen of the helper runs under strace, one trace file per run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.runs: list[tuple[str, Path]] = []
        self.test = "?"

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.test = item.nodeid

    def pytest_configure(self, config: pytest.Config) -> None:
        original = subprocess.Popen.__init__
        plugin = self

        def traced_init(popen: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
            if isinstance(args, list) and HELPER in map(str, args):
                args = plugin.traced([str(a) for a in args])
            original(popen, args, *rest, **kwargs)

        subprocess.Popen.__init__ = traced_init  # type: ignore[method-assign,assignment]

    def traced(self, argv: list[str]) -> list[str]:
        out = self.directory / f"{len(self.runs)}.trace"
        self.runs.append((self.test, out))
        if argv[0] != "strace":
            return ["strace", "-f", "-qq", "-o", str(out), *argv]
        # The test's own strace (delayed exit, slowed setsockopt): keep its injection, trace everything.
        widened: list[str] = []
        args = iter(argv)
        for arg in args:
            nxt = next(args) if arg in ("-o", "-e") else None
            if arg == "-o":
                widened += ["-o", str(out)]
            elif arg == "-e" and nxt is not None and nxt.startswith("trace="):
                continue
            else:
                widened += [arg] if nxt is None else [arg, nxt]
        return widened


def confined_calls(trace: Path) -> tuple[Counter[str], bool]:
    """System calls in `trace` made by the helper after the filter point; whether it had a filter."""
    lines = trace.read_text(errors="replace").splitlines()
    marker_pid = None
    for marker in _MARKERS:
        for line in lines:
            if marker in line:
                marker_pid = line.split()[0]
                start = lines.index(line) + 1
                break
        if marker_pid:
            break
    calls: Counter[str] = Counter()
    if marker_pid is None:
        return calls, False
    for line in lines[start:]:
        m = _CALL.match(line)
        if m and m.group(1) == marker_pid and m.group(3) == "(":
            calls[m.group(2)] += 1
        elif line.startswith(marker_pid) and "killed by SIGSYS" in line:
            calls["<killed by SIGSYS>"] += 1
    return calls, marker != "SO_PEERCRED"


def _audit_kills() -> list[str]:
    """comm and syscall of every seccomp kill the kernel logged (audit type 1326) so far."""
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return [
        " ".join(f for f in line.split() if f.startswith(("comm=", "syscall=", "arch=")))
        for line in log.splitlines()
        if "type=1326" in line
    ]


def main() -> int:
    args = sys.argv[1:] or ["tests/test_helper.py", "tests/test_hardening.py"]
    audit_before = len(_audit_kills())
    with tempfile.TemporaryDirectory() as tmp:
        plugin = StraceEveryHelper(Path(tmp))
        status = pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[plugin])
        total: Counter[str] = Counter()
        runs_with: Counter[str] = Counter()
        first_test: dict[str, str] = {}
        measured = 0
        unfiltered: Counter[str] = Counter()
        any_filtered = any(trace.exists() and confined_calls(trace)[1] for _, trace in plugin.runs)
        for test, trace in plugin.runs:
            if not trace.exists():
                continue
            calls, filtered = confined_calls(trace)
            if any_filtered and not filtered:  # --allow-unconfined, or refused before the filter
                unfiltered[test] += 1
                continue
            if calls:
                measured += 1
            total.update(calls)
            for name in calls:
                runs_with[name] += 1
                first_test.setdefault(name, test)
    print(f"\npytest exit status {status}; {len(plugin.runs)} helper runs, {measured} reached the filter point")
    print(f"runs without a filter, not counted: {dict(unfiltered) or 'none'}")
    print(f"{'system call':<22}{'calls':>9}{'runs':>6}  first seen in")
    for name, count in total.most_common():
        print(f"{name:<22}{count:>9}{runs_with[name]:>6}  {first_test[name]}")
    kills = _audit_kills()[audit_before:]
    helper_kills = [k for k in kills if 'comm="passt-repair"' in k]
    print(f"helper kills in the kernel's audit log: {helper_kills or 'none'}")
    print(f"other seccomp kills meanwhile (test_hardening kills its children): {len(kills) - len(helper_kills)}")
    try:
        from passt_repair.hardening import allowed_names
    except ImportError:
        return 0
    listed = allowed_names()
    seen = set(total) - {"<killed by SIGSYS>"}
    print(f"seen, not listed: {sorted(seen - listed) or 'none'}")
    print(f"listed, not seen: {sorted(listed - seen) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
