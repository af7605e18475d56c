# SPDX-License-Identifier: GPL-2.0-or-later
"""passt-repair-check, the conformance kit: it passes this helper, and it catches what other helpers break.

Three kinds of helper are checked: the installed one (every guarantee holds); the project's plain
C reference, bench/ref_helper.c, whose source says which guarantees it does not keep; and a small
Python helper written here that keeps every guarantee unless told to break exactly one, so each
check is shown to fail when, and only when, its guarantee is broken.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from passt_repair.check import GUARANTEES
from support import SETPRIV_NO_CAPS, have

ROOT = Path(__file__).resolve().parent.parent
CHECK = Path(sys.executable).with_name("passt-repair-check")
NAMES = {g.name for g in GUARANTEES}
DIRECTORY = {"directory-created-later", "directory-existing", "directory-late-listen"}


def run_check(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, str(CHECK), *args], capture_output=True, text=True, timeout=300, check=False)


def verdicts(out: str) -> dict[str, bool]:
    """{guarantee: holds} from the kit's report; every line is accounted for."""
    lines = out.splitlines()
    assert lines[0].startswith("passt-repair-check: checking ")
    found = {}
    for line in lines[1:-1]:
        word, rest = line.split("  ", 1)
        assert word in ("holds", "FAILS"), line
        name, why = rest.split(": ", 1)
        assert why, line
        found[name] = word == "holds"
    held = sum(found.values())
    assert lines[-1] == f"{held} of {len(found)} guarantees hold"
    return found


def failing(out: str) -> set[str]:
    return {name for name, holds in verdicts(out).items() if not holds}


def test_installed_helper_keeps_every_guarantee() -> None:
    done = run_check()
    assert done.stderr == ""
    assert verdicts(done.stdout) == dict.fromkeys(NAMES, True), done.stdout
    assert done.returncode == 0


@pytest.fixture(scope="module")
def ref_helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not have("cc"):
        pytest.skip("no C compiler (cc) to build bench/ref_helper.c")
    binary = tmp_path_factory.mktemp("ref") / "ref_helper"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(ROOT / "bench" / "ref_helper.c")], check=True, timeout=120)
    return binary


@pytest.mark.parametrize(
    ("args", "broken"),
    [
        # By default it reads no prior state and puts nothing back on a failure; it reads a request
        # one byte at a time; in directory mode it watches only for sockets created after it started.
        ((), {"all-or-nothing", "one-byte-requests", "directory-existing"}),
        # --exact adds the read-back and the roll-back, nothing else.
        (("--", "--exact"), {"one-byte-requests", "directory-existing"}),
    ],
    ids=["default", "exact"],
)
def test_c_reference_fails_exactly_what_it_does_not_keep(
    ref_helper: Path, args: tuple[str, ...], broken: set[str]
) -> None:
    done = run_check("--helper", str(ref_helper), *args)
    assert done.stderr == ""
    assert set(verdicts(done.stdout)) == NAMES
    assert failing(done.stdout) == broken, done.stdout
    assert done.returncode == 1


# A helper in Python that keeps every guarantee, each defect a switch: PYTHONPATH-free, standard library only.
MUTANT = textwrap.dedent(
    """
    import array, os, socket, stat, sys, time

    defect, path = sys.argv[1], sys.argv[2]
    SPACE = socket.CMSG_SPACE(253 * 4)

    def connect(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if not stat.S_ISDIR(os.stat(path).st_mode):
            s.connect(path)
            return s
        while True:  # directory mode by polling, not inotify
            for name in os.listdir(path):
                if name.endswith(".repair"):
                    try:
                        s.connect(os.path.join(path, name))
                        return s
                    except ConnectionRefusedError:
                        pass
            if defect != "spin":
                time.sleep(0.01)

    def switch(fds, value):
        views = [socket.socket(fileno=fd) for fd in fds]
        try:
            prior = [v.getsockopt(6, 19) for v in views]
            for i, v in enumerate(views):
                try:
                    v.setsockopt(6, 19, value)
                except OSError:
                    if defect != "no-rollback":
                        for w, p in zip(views[:i], prior):
                            w.setsockopt(6, 19, 1 if p else -1)
                    return False
            return True
        finally:
            for v in views:
                v.detach()

    conn, space, kept = connect(path), SPACE, []
    while True:
        data, anc, flags, _ = conn.recvmsg(16, space)
        if not data:
            sys.exit(0)
        fds = array.array("i")
        for _, _, payload in anc:
            fds.frombytes(payload[: len(payload) - len(payload) % 4])
        if defect == "shrink":  # upstream's bug: the kernel shrinks the length and nobody resets it
            space = socket.CMSG_SPACE(max(len(fds), 1) * 4)
        truncated = flags & socket.MSG_CTRUNC and defect != "ignore-ctrunc"
        value = int.from_bytes(data[:1], "little", signed=True)
        good = len(data) == 1 and fds and not truncated and value in (1, 0, -1) and switch(fds, value)
        if defect == "leak":
            kept += fds
        else:
            for fd in fds:
                os.close(fd)
        if not good:
            sys.exit(1)
        conn.send(data)
    """
)


@pytest.fixture(scope="module")
def mutant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = tmp_path_factory.mktemp("mutant") / "mutant-helper"
    script.write_text(f"#!{sys.executable} -I\n{MUTANT}")
    script.chmod(0o755)
    return script


def test_sound_python_helper_keeps_every_guarantee(mutant: Path) -> None:
    """The mutant with no defect passes: the failures below are its defects, not its design."""
    done = run_check("--helper", str(mutant), "--", "none")
    assert failing(done.stdout) == set(), done.stdout
    assert done.returncode == 0


@pytest.mark.parametrize(
    ("defect", "broken"),
    [
        ("shrink", "full-after-smaller"),
        ("ignore-ctrunc", "truncated-refused"),
        ("no-rollback", "all-or-nothing"),
        ("leak", "descriptors-closed"),
        ("spin", "directory-late-listen"),
    ],
)
def test_each_defect_fails_its_guarantee(mutant: Path, defect: str, broken: str) -> None:
    """One defect, one failing line; the guarantees it leaves alone still hold."""
    neighbours = sorted({broken, "command-on", "end-of-file-exits-0"})
    done = run_check("--helper", str(mutant), "--only", ",".join(neighbours), "--", defect)
    assert failing(done.stdout) == {broken}, done.stdout
    assert set(verdicts(done.stdout)) == set(neighbours)
    assert done.returncode == 1


def test_a_helper_that_does_nothing_fails_cleanly() -> None:
    """/bin/true exits at once: every guarantee fails with a reason, and the kit itself does not crash."""
    done = run_check("--helper", "/bin/true")
    assert "Traceback" not in done.stdout + done.stderr
    assert failing(done.stdout) == NAMES
    assert "exited with status 0 without connecting" in done.stdout
    assert done.returncode == 1


def test_without_root_it_says_so() -> None:
    done = run_check(prefix=tuple(SETPRIV_NO_CAPS))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("passt-repair-check: error: needs root")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--helper", "/nonexistent/helper"), "not an executable file"),
        (("--helper",), "--helper needs a value"),
        (("--only", "no-such-thing"), "no guarantee named no-such-thing"),
        (("--directory", "/nonexistent/dir"), "not a directory"),
        (("extra",), "unexpected argument extra"),
    ],
)
def test_usage_errors(args: tuple[str, ...], fragment: str) -> None:
    done = run_check(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("passt-repair-check: error: ")
    assert fragment in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_sockets_made_where_asked_and_cleaned_up() -> None:
    """--directory: under a MAC policy the kit's servers must sit where the helper may connect."""
    with tempfile.TemporaryDirectory(prefix="kit.", dir="/tmp") as directory:
        done = run_check("--directory", directory, "--only", "command-on,directory-existing,directory-late-listen")
        assert failing(done.stdout) == set(), done.stdout
        assert done.returncode == 0
        assert os.listdir(directory) == []


def test_a_directory_too_deep_for_socket_paths(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    done = run_check("--directory", str(deep))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("passt-repair-check: error: ")
    assert "too deep for the sockets' paths (107 bytes)" in done.stderr
    assert list(deep.iterdir()) == []


def test_too_few_descriptors_for_the_test_sockets() -> None:
    """The kit needs 253 connected pairs; with a hard limit below that it says so instead of failing every check."""
    done = run_check(prefix=("prlimit", "--nofile=200:200"))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("passt-repair-check: error: cannot make 253 loopback TCP connections (open files")
    assert len(done.stderr.splitlines()) == 1


def test_help_names_every_guarantee() -> None:
    done = run_check("--help")
    assert done.returncode == 0
    assert all(name in done.stdout for name in NAMES)
