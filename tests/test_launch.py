# SPDX-License-Identifier: GPL-2.0-or-later
"""How the installed passt-repair command starts: isolated from its environment, and its command line.

Every test runs the installed command (the launcher bin/passt-repair) as root,
with the vectors that could make an interpreter run someone else's code before
the helper's first line: each plants code that would write a marker file, and
checks that the marker never appears while the helper does its work as usual.
A control shows, with the same plant, that the vector is real for an
interpreter that is not isolated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from passt_repair.protocol import Command
from support import HELPER, RawServer, TcpPairs, assert_clean_stderr, error_lines, state, wait_serving

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "docs" / "passt-repair.1"
PYTHON = Path(sys.executable)
SITE = Path(next(p for p in sys.path if p.endswith("site-packages")))
VERSION = f"python{sys.version_info[0]}.{sys.version_info[1]}"


def plant(path: Path, marker: Path) -> None:
    """A Python file that leaves `marker` behind if it ever runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # posix: builtins such as open() may not exist yet where the plant runs (the standard library's encodings)
    path.write_text(f"import posix; posix.close(posix.open({str(marker)!r}, posix.O_WRONLY | posix.O_CREAT))\n")


def serve_one(
    tmp_path: Path, pairs: TcpPairs, env: dict[str, str], cwd: Path | None = None, argv: list[str] | None = None
) -> tuple[int, str]:
    """Start the command with `env`, switch one socket through it, close; return its status and stderr."""
    server = RawServer(tmp_path / "s.repair")
    sock = pairs.make(1)[0]
    proc = subprocess.Popen(
        [*(argv or [str(HELPER)]), str(server.path)], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        server.accept()
        assert server.request(Command.ON, [sock.fileno()]) == Command.ON.byte
        assert state(sock) == 1
        server.close()
        _, err = proc.communicate(timeout=20)
    finally:
        server.close()
        server.path.unlink()
        proc.kill()
        proc.wait()
    return proc.returncode, err.decode()


def clean_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "marker"


def assert_not_ran(marker: Path, status: int, stderr: str) -> None:
    assert not marker.exists(), "planted code ran in the helper"
    assert status == 0, stderr  # a SIGSYS would be -31
    assert_clean_stderr(stderr)
    assert error_lines(stderr) == []


# -- each vector, against the installed command ------------------------------------


def test_pythonpath_sitecustomize(tmp_path: Path, pairs: TcpPairs, marker: Path) -> None:
    plant(tmp_path / "planted" / "sitecustomize.py", marker)
    env = clean_env(PYTHONPATH=str(tmp_path / "planted"))
    subprocess.run([str(PYTHON), "-c", "pass"], env=env, check=True)  # the control: the vector is real
    assert marker.exists()
    marker.unlink()
    assert_not_ran(marker, *serve_one(tmp_path, pairs, env))


def test_pythonhome(tmp_path: Path, pairs: TcpPairs, marker: Path) -> None:
    """A prefix of someone else's, whose standard library would run their code at the first import."""
    home = tmp_path / "home"
    plant(home / "lib" / VERSION / "encodings" / "__init__.py", marker)
    env = clean_env(PYTHONHOME=str(home))
    subprocess.run([str(PYTHON), "-c", "pass"], env=env, capture_output=True)  # dies after running it
    assert marker.exists()
    marker.unlink()
    assert_not_ran(marker, *serve_one(tmp_path, pairs, env))


def test_pythonwarnings_browser(tmp_path: Path, pairs: TcpPairs, marker: Path) -> None:
    """No file at all: a warning filter naming a module imports it, and that one starts $BROWSER."""
    env = clean_env(PYTHONWARNINGS="ignore::antigravity.x", BROWSER=f"sh -c 'echo ran > {marker}' %s")
    subprocess.run([str(PYTHON), "-c", "pass"], env=env, capture_output=True)
    for _ in range(100):  # the browser runs in the background
        if marker.exists():
            break
        time.sleep(0.01)
    assert marker.exists()
    marker.unlink()
    status, err = serve_one(tmp_path, pairs, env)
    time.sleep(0.2)
    assert_not_ran(marker, status, err)


@pytest.mark.parametrize("planted", ["_socket.py", "passt_repair/__init__.py", "posix.py", "errno.py"])
def test_current_directory(tmp_path: Path, pairs: TcpPairs, marker: Path, planted: str) -> None:
    """Modules planted in the working directory, for the command and for `python -I -m passt_repair`."""
    workdir = tmp_path / "work"
    plant(workdir / planted, marker)
    status, err = serve_one(tmp_path, pairs, clean_env(), cwd=workdir)
    assert_not_ran(marker, status, err)
    status, err = serve_one(tmp_path, pairs, clean_env(), cwd=workdir, argv=[str(PYTHON), "-I", "-m", "passt_repair"])
    assert_not_ran(marker, status, err)


def test_user_site(tmp_path: Path, pairs: TcpPairs, marker: Path) -> None:
    home = tmp_path / "user"
    user_site = home / ".local" / "lib" / VERSION / "site-packages"
    plant(user_site / "usercustomize.py", marker)
    assert_not_ran(marker, *serve_one(tmp_path, pairs, clean_env(HOME=str(home), PYTHONUSERBASE=str(home / ".local"))))


def test_pth_file_in_site_packages(tmp_path: Path, pairs: TcpPairs, marker: Path) -> None:
    """-S: a .pth file in the installation's own site-packages (one a package dropped there) does not run."""
    pth = SITE / "zz-planted-by-test.pth"
    pth.write_text(f"import os; open({str(marker)!r}, 'w').write('ran')\n")
    try:
        subprocess.run([str(PYTHON), "-I", "-c", "pass"], check=True)  # the control: site runs it
        assert marker.exists()
        marker.unlink()
        assert_not_ran(marker, *serve_one(tmp_path, pairs, clean_env()))
    finally:
        pth.unlink()


@pytest.mark.parametrize("variable", ["PYTHONFAULTHANDLER", "PYTHONDEVMODE", "PYTHONINSPECT", "PYTHONMALLOC"])
def test_variables_that_would_draw_sigsys(tmp_path: Path, pairs: TcpPairs, marker: Path, variable: str) -> None:
    """Each would make the interpreter use system calls outside the filter (at exit, or on error)."""
    value = "debug" if variable == "PYTHONMALLOC" else "1"
    assert_not_ran(marker, *serve_one(tmp_path, pairs, clean_env(**{variable: value})))


def test_no_bytecode_written(tmp_path: Path, pairs: TcpPairs) -> None:
    """The installation ships compiled modules, and the helper (root) never writes any itself."""
    package = SITE / "passt_repair"
    shipped = {p.name for p in (package / "__pycache__").glob("*.pyc")}
    tag = sys.implementation.cache_tag
    for module in ("__init__", "cli", "helper", "hardening"):
        assert f"{module}.{tag}.pyc" in shipped, f"{module} is not compiled at install: every start compiles it"
    cache = tmp_path / "cache"
    status, err = serve_one(tmp_path, pairs, clean_env(PYTHONPYCACHEPREFIX=str(cache)))
    assert status == 0, err
    assert not cache.exists()
    stamp = {p: p.stat().st_mtime_ns for p in (package / "__pycache__").iterdir()}
    status, _ = serve_one(tmp_path, pairs, clean_env())
    assert {p: p.stat().st_mtime_ns for p in (package / "__pycache__").iterdir()} == stamp


def test_python_m_without_isolation_says_so(tmp_path: Path, pairs: TcpPairs) -> None:
    status, err = serve_one(tmp_path, pairs, clean_env(), argv=[str(PYTHON), "-m", "passt_repair"])
    assert status == 0
    assert "warning: not started isolated (python -I)" in err
    assert_clean_stderr(err)
    status, err = serve_one(tmp_path, pairs, clean_env(), argv=[str(PYTHON), "-I", "-m", "passt_repair"])
    assert status == 0
    assert "warning" not in err


def test_launcher_through_a_symbolic_link(tmp_path: Path, pairs: TcpPairs) -> None:
    link = tmp_path / "bin" / "passt-repair"
    link.parent.mkdir()
    link.symlink_to(HELPER)
    status, err = serve_one(tmp_path, pairs, clean_env(), argv=[str(link)])
    assert status == 0, err


def test_launcher_ignores_a_function_exported_by_bash(tmp_path: Path, pairs: TcpPairs, marker: Path) -> None:
    """/bin/sh may be bash, which imports exported functions: none may stand in for the launcher's commands."""
    link = tmp_path / "bin" / "passt-repair"
    link.parent.mkdir()
    link.symlink_to(HELPER)
    env = clean_env(**{"BASH_FUNC_readlink%%": f"() {{ echo ran > {marker}; }}"})
    status, err = serve_one(tmp_path, pairs, env, argv=["bash", "--posix", str(link)])
    assert_not_ran(marker, status, err)


def test_launcher_ignores_a_readlink_planted_on_path(tmp_path: Path, pairs: TcpPairs, marker: Path) -> None:
    """Reached through a symbolic link, the launcher runs readlink by its absolute path, not PATH's."""
    link = tmp_path / "bin" / "passt-repair"
    link.parent.mkdir()
    link.symlink_to(HELPER)
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "readlink").write_text(f"#!/bin/sh\necho ran > {marker}\nexit 1\n")
    (planted / "readlink").chmod(0o755)
    env = clean_env()
    env["PATH"] = f"{planted}:{env.get('PATH', '/usr/bin:/bin')}"
    status, err = serve_one(tmp_path, pairs, env, argv=[str(link)])
    assert_not_ran(marker, status, err)


# -- the command line -----------------------------------------------------------------


def run_cli(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HELPER), *args], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=20)


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_output_to_a_closed_pipe(option: str) -> None:
    """`passt-repair --help | true`: the reader has gone; no traceback, exit 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([str(HELPER), option], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=20)
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (0, "")


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_output_to_a_full_disk(option: str) -> None:
    with open("/dev/full", "w") as full:
        r = subprocess.run([str(HELPER), option], stdout=full, stderr=subprocess.PIPE, text=True, timeout=20)
    assert r.returncode == 1
    assert r.stderr == "passt-repair: error: write to standard output: No space left on device\n"


def test_double_dash_ends_options(tmp_path: Path) -> None:
    r = run_cli("--", "--help")
    assert r.returncode == 1
    assert r.stderr == "passt-repair: error: stat --help: ENOENT (No such file or directory)\n"
    assert r.stdout == ""


def test_empty_path() -> None:
    r = run_cli("")
    assert r.returncode == 2
    assert r.stderr.startswith("passt-repair: PATH is empty (usage: passt-repair ")


@pytest.mark.parametrize("value", [None, "0", "-1", "nan", "inf", "x", "1e99", "٣"])
def test_timeout_usage_errors(tmp_path: Path, value: str | None) -> None:
    r = run_cli(str(tmp_path), "--timeout", *([value] if value is not None else []))
    assert r.returncode == 2
    assert_clean_stderr(r.stderr)
    assert "--timeout" in r.stderr


def test_names_in_usage_errors_are_escaped() -> None:
    r = run_cli("--peer-uid", "1\x1b]0;x\x07")
    assert r.returncode == 2
    assert "\x1b" not in r.stderr
    assert "\x07" not in r.stderr
    assert len(r.stderr.splitlines()) == 1


def man_example(section: str) -> list[str]:
    """The lines of the first example block (.EX ... .EE) of a man page section, as a shell reads them."""
    text = MAN.read_text().split(f"\n.SH {section}\n", 1)[1].split("\n.SH ", 1)[0]
    blocks = re.findall(r"\.EX\n(.*?)\n\.EE", text, re.S)
    return [block.replace("\\-", "-").replace("\\e\n", " ").replace("\\e", "\\") for block in blocks]


def command_for_nobody(where: Path) -> Path:
    """The installed command, or, where user nobody cannot run its interpreter (a pyenv under /root), the
    same launcher and package copied beside a virtual environment of the system's interpreter."""
    if subprocess.run(["setpriv", "--reuid=nobody", "test", "-x", str(PYTHON)]).returncode == 0:
        return HELPER
    system = Path(f"/usr/bin/{VERSION}")
    if not system.exists():
        pytest.skip(f"user nobody cannot run {PYTHON}, and there is no {system}")
    venv = where / "venv"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True)
    shutil.copytree(SITE / "passt_repair", venv / "lib" / VERSION / "site-packages" / "passt_repair")
    shutil.copy(HELPER, venv / "bin" / "passt-repair")
    return venv / "bin" / "passt-repair"


def test_setpriv_line_of_the_man_page_works_as_written(tmp_path: Path, pairs: TcpPairs) -> None:
    """The CAPABILITIES example: another user with CAP_NET_ADMIN alone (started as root, as sudo does).

    Only the names change: the user nobody for passt-repair, the installed command, this test's socket.
    """
    line = next(block for block in man_example("CAPABILITIES") if "setpriv" in block)
    words = line.split()
    assert words[:2] == ["sudo", "setpriv"]
    command_at = words.index("passt-repair")
    names = {"--reuid=passt-repair": "--reuid=nobody", "--regid=passt-repair": "--regid=nogroup"}
    setpriv = [names.get(w, w) for w in words[1:command_at]]
    assert words[command_at + 1 : command_at + 3] == ["--peer-uid", "1000"]
    reachable = Path(tempfile.mkdtemp(prefix="setpriv-", dir="/tmp"))  # pytest's own tmp is root's alone
    reachable.chmod(0o755)
    command = command_for_nobody(reachable)
    server = RawServer(reachable / "s.repair")
    server.path.chmod(0o777)
    sock = pairs.make(1)[0]
    proc = subprocess.Popen([*setpriv, str(command), "--peer-uid", "0", str(server.path)], stderr=subprocess.PIPE)
    try:
        server.accept()
        wait_serving(server.peer_pid)
        status = Path(f"/proc/{server.peer_pid}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s", status, re.M)
        assert re.search(r"^CapEff:\s+0000000000001000$", status, re.M)
        assert server.request(Command.ON, [sock.fileno()]) == Command.ON.byte
        assert state(sock) == 1
        server.close()
        _, err = proc.communicate(timeout=20)
    finally:
        server.close()
        proc.kill()
        proc.wait()
        shutil.rmtree(reachable)
    assert proc.returncode == 0, err
    assert_clean_stderr(err.decode())


def test_help_and_man_page_say_what_to_give_for_passt_started_as_root() -> None:
    help_text = " ".join(run_cli("--help").stdout.split())
    assert "passt started as root binds as root, then runs as nobody: give that uid instead" in help_text
    assert "--peer-uid 65534" in MAN.read_text().replace("\\-", "-")
