# SPDX-License-Identifier: GPL-2.0-or-later
"""The documentation against the code: the man page renders cleanly and agrees with --help and with
what the helper logs; the package ships it; every Python example of the guide and of examples/ runs.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import passt_repair
from passt_repair.protocol import Command
from support import HELPER, SETPRIV_NO_CAPS, TcpPairs, have, raw_server_with_helper

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "docs" / "passt-repair.1"
GUIDE = ROOT / "docs" / "guide.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
#: A --debug line, as the helper prints it and as the man page shows it.
DEBUG_LINE = re.compile(r"passt-repair: (ON \(1\)|OFF \(0\)|OFF_NO_WP \(-1\)) on (\d+) sockets? in \d+ us")
#: Options the man page documents ahead of the hardening work that adds them to the helper.
HARDENING_OPTIONS = {"--peer-uid", "--allow-unconfined"}


def roff_to_text(roff: str) -> str:
    """Roff source with the escapes this page uses resolved, enough to read option names and examples."""
    return re.sub(r"\\f[BIRP]", "", roff.replace("\\-", "-").replace("\\e", "\\"))


def man_section(name: str) -> str:
    return MAN.read_text().split(f"\n.SH {name}\n", 1)[1].split("\n.SH ", 1)[0]


def man_options() -> set[str]:
    """The options the man page documents: the tags of the .TP entries under OPTIONS."""
    lines = man_section("OPTIONS").splitlines()
    tags = [roff_to_text(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line == ".TP"]
    return {option for tag in tags for option in re.findall(r"--[a-z][a-z-]*", tag)}


def help_options() -> set[str]:
    """The options the installed helper's --help lists in its options block."""
    r = subprocess.run([str(HELPER), "--help"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0
    block = re.search(r"^(?:options|optional arguments):\n((?:[ \t].*\n?|\n)*?)(?:\n(?=\S)|\Z)", r.stdout, re.M)
    assert block, r.stdout
    found = set()
    for line in block[1].splitlines():
        entry = re.match(r"\s+(-\S.*?)(?:\s{2,}|$)", line)
        if entry:
            found |= set(re.findall(r"--[a-z][a-z-]*", entry[1]))
    return found


# -- the man page ---------------------------------------------------------------


@pytest.mark.parametrize("macros", ["-man", "-mandoc"])
def test_man_page_renders_without_warnings(macros: str) -> None:
    if not have("groff"):
        pytest.skip("groff is not installed")
    r = subprocess.run(["groff", "-ww", "-z", macros, str(MAN)], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_man_page_name_line_is_indexable() -> None:
    """mandb/whatis read the NAME section (lexgrog is man-db's parser for it)."""
    if not have("lexgrog"):
        pytest.skip("lexgrog (man-db) is not installed")
    r = subprocess.run(["lexgrog", str(MAN)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0
    assert '"passt-repair - ' in r.stdout


def test_package_ships_the_man_page() -> None:
    shipped = importlib.resources.files("passt_repair") / "passt-repair.1"
    assert shipped.read_text() == MAN.read_text()
    title = MAN.read_text().split("\n.TH ", 1)[1].splitlines()[0]
    assert f'"passt\\-repair {passt_repair.__version__}"' in title


def test_every_help_option_is_in_the_man_page() -> None:
    assert help_options() - man_options() == set()


def test_every_man_page_option_is_in_help() -> None:
    assert man_options() - help_options() == set()


def test_synopsis_is_the_usage_line_everywhere() -> None:
    """--help's usage line, the README's synopsis and the man page's SYNOPSIS name the same options."""
    usage = subprocess.run([str(HELPER), "--help"], capture_output=True, text=True, timeout=20).stdout.splitlines()[0]
    assert usage.startswith("usage: passt-repair ")
    readme = (ROOT / "README.md").read_text()
    assert f"\n    {usage.removeprefix('usage: ')}\n" in readme
    synopsis = roff_to_text(man_section("SYNOPSIS").split(".br", 1)[0])
    in_usage = set(re.findall(r"--[a-z][a-z-]*|(?<![\w-])--(?![\w-])", usage))
    in_synopsis = set(re.findall(r"--[a-z][a-z-]*|(?<![\w-])--(?![\w-])", synopsis))
    assert in_usage == in_synopsis
    assert "--" in in_usage


def test_security_doc_refers_to_the_shipped_unit() -> None:
    """One systemd unit: the shipped one. SECURITY.md shows no unit of its own and says why
    PrivateNetwork=yes, which the unit sets, is right."""
    security = (ROOT / "docs" / "SECURITY.md").read_text()
    unit = (ROOT / "contrib" / "systemd" / "passt-repair@.service").read_text()
    assert "[Service]" not in security
    assert "contrib/systemd/passt-repair@.service" in security
    assert "PrivateNetwork=yes" in unit
    assert "`PrivateNetwork=yes` is right" in security
    assert "must stay off" not in security


def test_no_bare_python_m_in_the_docs() -> None:
    """`python -m passt_repair` without -I is nobody's documented way to start the helper."""
    for doc in [ROOT / "README.md", MAN, *sorted((ROOT / "docs").glob("*.md"))]:
        text = roff_to_text(doc.read_text())
        assert not re.search(r"python3? -m passt_repair", text), doc.name


def test_option_lists_are_read() -> None:
    """The two parsers above find what is there (else the comparisons prove nothing)."""
    assert {"--debug", "--help", "--version"} <= help_options()
    assert {"--debug", "--help", "--version", *HARDENING_OPTIONS} <= man_options()


def test_man_page_debug_example_is_what_the_helper_prints(tmp_path: Path, pairs: TcpPairs) -> None:
    example = [line for line in roff_to_text(man_section("EXAMPLES")).splitlines() if " sockets in " in line]
    assert example
    assert all(DEBUG_LINE.fullmatch(line) for line in example), example
    sock = pairs.make(1)[0]
    with raw_server_with_helper(tmp_path, "--debug") as (server, helper):
        assert server.request(Command.OFF_NO_WP, [sock.fileno()]) == Command.OFF_NO_WP.byte
    assert DEBUG_LINE.fullmatch(helper.stderr.splitlines()[-1])


# -- what the helper logs -----------------------------------------------------------


@pytest.mark.parametrize("debug", [False, True])
def test_helper_logs_nothing_per_socket(tmp_path: Path, pairs: TcpPairs, debug: bool) -> None:
    """Without --debug: one line (connected) for a whole session; with it: one more per message, never per socket."""
    socks = pairs.make(300)
    args = ("--debug",) if debug else ()
    with raw_server_with_helper(tmp_path, *args) as (server, helper):
        for command in (Command.ON, Command.OFF, Command.ON, Command.OFF_NO_WP):
            for chunk in (socks[:253], socks[253:]):
                assert server.request(command, [s.fileno() for s in chunk]) == command.byte
    assert helper.wait() == 0
    lines = helper.stderr.splitlines()
    assert " connected to " in lines[0]
    assert len(lines) == 1 + (8 if debug else 0), lines
    assert all(DEBUG_LINE.fullmatch(line) for line in lines[1:])


# -- examples ------------------------------------------------------------------------


def guide_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", GUIDE.read_text(), re.S | re.M)


#: PATH as after the README's set-up: the virtual environment is not on it.
PLAIN_PATH = os.pathsep.join(
    d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if Path(d) != HELPER.parent
)


def run_example(
    args: list[str], cwd: Path, python: str = sys.executable, prefix: tuple[str, ...] = (), **extra_env: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": PLAIN_PATH, **extra_env}
    return subprocess.run([*prefix, python, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def assert_ran(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_guide_has_examples() -> None:
    assert len(guide_blocks()) >= 6


@pytest.mark.parametrize("number", range(len(guide_blocks())))
def test_guide_example_runs(tmp_path: Path, number: int) -> None:
    """Each ```python block of docs/guide.md, as a program of its own, against the installed helper."""
    assert_ran(run_example(["-c", guide_blocks()[number]], tmp_path))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(tmp_path: Path, example: Path) -> None:
    """`.venv/bin/python examples/X.py` as root, the virtual environment not on PATH."""
    assert_ran(run_example([str(example)], tmp_path))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_without_capabilities_ends_at_once(tmp_path: Path, example: Path) -> None:
    """Without CAP_NET_ADMIN the helper exits 1 at once with its reason; the example follows it, no 10 s wait."""
    started = time.monotonic()
    r = run_example([str(example)], tmp_path, prefix=tuple(SETPRIV_NO_CAPS))
    took = time.monotonic() - started
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "passt-repair: error: CAP_NET_ADMIN is not in the effective capability set" in r.stderr
    assert r.stderr.rstrip().endswith("the helper exited with status 1 without connecting")
    assert took < 5, f"took {took:.1f} s"


def python_3_10() -> str | None:
    """A working Python 3.10 interpreter: on PATH, or installed by pyenv (its shim may point elsewhere)."""
    candidates = [shutil.which("python3.10"), *map(str, Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True)
        if probe.returncode == 0 and probe.stdout.strip() == b"(3, 10)":
            return candidate
    return None


def test_async_example_runs_on_python_3_10(tmp_path: Path) -> None:
    """asyncio differs between 3.10 and 3.11 (its TimeoutError, for one): run the asyncio example on 3.10."""
    python = python_3_10()
    if python is None:
        pytest.skip("no Python 3.10 interpreter found")
    path = f"{HELPER.parent}{os.pathsep}{PLAIN_PATH}"  # that interpreter has no passt-repair beside it
    assert_ran(
        run_example(
            [str(ROOT / "examples" / "async_server.py")], tmp_path, python, PYTHONPATH=str(ROOT / "src"), PATH=path
        )
    )


# -- the guide's shell commands ------------------------------------------------------


def guide_commands() -> list[str]:
    """The guide's shell commands that need neither passt nor systemd: those run with the README's set-up."""
    blocks = re.findall(r"^```sh\n(.*?)^```$", GUIDE.read_text(), re.S | re.M)
    lines = [line for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith((".venv/bin/", "man -l "))]


def test_guide_commands_are_found() -> None:
    assert {c.split()[0] for c in guide_commands()} == {".venv/bin/python", ".venv/bin/passt-repair-check", "man"}


@pytest.mark.parametrize("command", guide_commands())
def test_guide_command_runs_as_written(tmp_path: Path, command: str) -> None:
    """Each command as the guide writes it, in a directory where the README's `.venv` is, that not on PATH."""
    if command.startswith("man ") and not have("man"):
        pytest.skip("man is not installed")
    (tmp_path / ".venv").symlink_to(sys.prefix)
    (tmp_path / "example.py").write_text(guide_blocks()[0])  # "Save one as example.py"
    env = {**os.environ, "PATH": PLAIN_PATH, "MANPAGER": "cat", "MANWIDTH": "80"}
    r = subprocess.run(["sh", "-c", command], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    if command.startswith("man "):
        assert "passt-repair" in r.stdout
        assert "TCP_REPAIR" in r.stdout
