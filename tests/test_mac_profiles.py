# SPDX-License-Identifier: GPL-2.0-or-later
"""The AppArmor profile and the SELinux module in contrib/: they build, and they fit the helper.

This machine's kernel enforces neither, so what is checked is what can be without one: the
AppArmor profile compiles with apparmor_parser (nothing loaded), the SELinux module compiles with
checkmodule and semodule_package (through the reference policy's Makefile); both tools fail on a
broken copy. What no parser sees is checked against a real run: every file the installed helper
opens, maps or executes while serving requests (socket and directory mode, traced with strace) is
granted by a rule of the AppArmor profile, and nothing broad is.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import passt_repair
from passt_repair.protocol import Command
from support import HELPER, RawServer, TcpPairs, have

ROOT = Path(__file__).resolve().parent.parent
APPARMOR = ROOT / "contrib" / "apparmor" / "passt-repair-python"
APPARMOR_VARS_EXAMPLE = ROOT / "contrib" / "apparmor" / "local" / "passt-repair-python.vars"
SELINUX = ROOT / "contrib" / "selinux"
SELINUX_MAKEFILE = Path("/usr/share/selinux/devel/Makefile")
#: The tunable from <tunables/multiarch> that the profile uses.
TUNABLES = {"multiarch": ["*-linux-gnu*"], "PROC": ["/proc"], "pid": ["[1-9]*"]}


def need(tool: str, package: str) -> None:
    if not have(tool):
        pytest.skip(f"{tool} is not installed (Debian package {package})")


# -- AppArmor: the parser ------------------------------------------------------------


def apparmor_parse(profile: Path, *include_dirs: Path) -> subprocess.CompletedProcess[bytes]:
    """Compile the profile to stdout (-S), loading nothing (-Q) and caching nothing (-K)."""
    includes = [arg for d in include_dirs for arg in ("-I", str(d))]
    return subprocess.run(
        ["apparmor_parser", "-Q", "-K", "-S", *includes, str(profile)],
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_apparmor_profile_compiles() -> None:
    need("apparmor_parser", "apparmor")
    done = apparmor_parse(APPARMOR)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) > 1000  # a compiled policy, not an empty one


def test_apparmor_profile_compiles_with_the_documented_local_additions(tmp_path: Path) -> None:
    """The example local file's lines, uncommented, plus a local rule, are what an administrator adds."""
    need("apparmor_parser", "apparmor")
    local = tmp_path / "local"
    local.mkdir()
    lines = [line.lstrip("# ") for line in APPARMOR_VARS_EXAMPLE.read_text().splitlines() if "+=" in line]
    assert len(lines) >= 4
    (local / "passt-repair-python.vars").write_text("\n".join(lines) + "\n")
    (local / "passt-repair-python").write_text("capability dac_override,\n")
    done = apparmor_parse(APPARMOR, tmp_path)
    assert done.returncode == 0, done.stderr
    expanded = subprocess.run(
        ["apparmor_parser", "-Q", "-K", "-I", str(tmp_path), "-D", "expanded-variables", str(APPARMOR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert '"/opt/passt-repair/venv"' in expanded.stdout


def test_apparmor_parser_rejects_a_broken_profile(tmp_path: Path) -> None:
    need("apparmor_parser", "apparmor")
    broken = tmp_path / "broken"
    broken.write_text(APPARMOR.read_text().replace("capability net_admin,", "capability net_admn,"))
    done = apparmor_parse(broken)
    assert done.returncode != 0
    assert b"net_admn" in done.stderr


# -- AppArmor: the rules, read here ---------------------------------------------------


@dataclass(frozen=True)
class Rule:
    pattern: str
    regex: re.Pattern[str]
    permissions: str
    deny: bool


def glob_to_regex(glob: str) -> str:
    """An AppArmor path glob as a regular expression: *, **, ?, [..], {a,b} (nested)."""
    out, i, depth = [], 0, 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = glob.index("]", i)
            out.append(glob[i : end + 1])
            i = end
        elif c == "{":
            out.append("(?:")
            depth += 1
        elif c == "}" and depth:
            out.append(")")
            depth -= 1
        elif c == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def expand(pattern: str, variables: dict[str, list[str]]) -> list[str]:
    match = re.search(r"@\{(\w+)\}", pattern)
    if not match:
        return [pattern]
    values = variables[match[1]]
    return [p for v in values for p in expand(pattern[: match.start()] + v + pattern[match.end() :], variables)]


def read_variables(*texts: str) -> dict[str, list[str]]:
    variables = {k: list(v) for k, v in TUNABLES.items()}
    for text in texts:
        for name, op, values in re.findall(r"^@\{(\w+)\}\s*(\+?=)\s*(.+)$", text, re.M):
            variables[name] = (variables.get(name, []) if op == "+=" else []) + values.split()
    return variables


def profile_body(text: str) -> str:
    return text.split("profile passt-repair-python ", 1)[1]


def read_rules(text: str, variables: dict[str, list[str]]) -> list[Rule]:
    rules = []
    for line in profile_body(text).splitlines():
        m = re.match(r"\s*(deny\s+)?(?:owner\s+)?((?:/|@\{)\S*)\s+([rwamlkixupPUC]+)\s*,", line)
        if m:
            for pattern in expand(m[2], variables):
                rules.append(Rule(pattern, re.compile(glob_to_regex(pattern)), m[3], bool(m[1])))
    return rules


def allowed(rules: list[Rule], path: str, permission: str) -> bool:
    """Whether the profile grants `permission` (one letter) on `path`: an allow rule and no deny rule."""
    matching = [r for r in rules if permission in r.permissions and r.regex.fullmatch(path)]
    return any(not r.deny for r in matching) and not any(r.deny for r in matching)


def denied_on_purpose(rules: list[Rule], path: str, permission: str) -> bool:
    return any(r.deny and permission in r.permissions and r.regex.fullmatch(path) for r in rules)


def test_glob_translation() -> None:
    """The matcher the coverage test relies on reads globs as AppArmor does."""
    cases = {
        ("/usr/lib/python3.[0-9]*/**", "/usr/lib/python3.11/encodings/utf_8.py"): True,
        ("/usr/lib/python3.[0-9]*/**", "/usr/lib/python3/dist-packages/x.py"): False,
        ("/tmp/passt_*.socket.repair", "/tmp/passt_1.socket.repair"): True,
        ("/tmp/passt_*.socket.repair", "/tmp/x/passt_1.socket.repair"): False,
        ("/{usr/,}bin/{sh,dash,bash}", "/bin/dash"): True,
        ("/{usr/,}bin/{sh,dash,bash}", "/usr/bin/zsh"): False,
        ("/lib/python3{,.[0-9]*}/{site,dist}-packages/", "/lib/python3/dist-packages/"): True,
        ("/run/passt/{,**/}", "/run/passt/a/b/"): True,
    }
    for (glob, path), expected in cases.items():
        assert bool(re.fullmatch(glob_to_regex(glob), path)) is expected, (glob, path)


def test_apparmor_profile_grants_nothing_broad() -> None:
    """No rule reaches secrets, home directories, /proc or devices; writes go to repair sockets and /dev/null only."""
    text = APPARMOR.read_text()
    rules = [r for r in read_rules(text, read_variables(text)) if not r.deny]
    for path in ["/etc/shadow", "/etc/passwd", "/root/.ssh/id_ed25519", "/home/user/.bashrc", "/proc/1/mem",
                 "/proc/self/environ", "/dev/sda", "/dev/kmem", "/var/lib/libvirt/images/vm.qcow2", "/tmp/other",
                 "/usr/bin/python3", "/usr/bin/passt-repair", "/usr/lib/python3/dist-packages/other/x.py",
                 "/run/libvirt/qemu/passt/vm.pid", "/run/user/1000/bus"]:  # fmt: skip
        for permission in "wam" if path.startswith("/usr/") else "rwaxm":
            assert not allowed(rules, path, permission), (path, permission)
    writable = {r.pattern for r in rules if set(r.permissions) & set("wa")}
    assert all(p == "/dev/null" or p.endswith(".repair") for p in writable), writable
    assert not any(r.pattern.rstrip("/*") in ("", "/usr", "/run", "/tmp") for r in rules)
    capabilities = set(re.findall(r"^\s*capability\s+(\w+)\s*,", profile_body(text), re.M))
    assert capabilities == {"net_admin", "setpcap"}
    assert re.findall(r"^\s*network\s+(.+),", text, re.M) == ["unix stream", "inet stream", "inet6 stream"]


@dataclass(frozen=True)
class Access:
    path: str
    permission: str  # r, w, x or m
    call: str


def traced_accesses(log: Path) -> Iterator[Access]:
    """Every successful file access in an strace -f log, as AppArmor would judge it (symbolic links resolved)."""
    for line in log.read_text().splitlines():
        m = re.match(r"\d+\s+(\w+)\((.*)\)\s+=\s+(-?\d+)", line)
        if not m or m[3].startswith("-"):
            continue
        call, args = m[1], m[2]
        quoted = re.findall(r'"((?:[^"\\]|\\.)*)"', args)
        if call == "execve":
            yield Access(os.path.realpath(quoted[0]), "x", call)
        elif call in ("open", "openat"):
            assert args.startswith(("AT_FDCWD", '"/')) or quoted[0].startswith("/"), line
            path = os.path.realpath(quoted[0])
            if "O_DIRECTORY" in args:
                yield Access(path.rstrip("/") + "/", "r", call)
                continue
            yield Access(path, "w" if re.search(r"O_WRONLY|O_RDWR|O_CREAT", args) else "r", call)
            if re.search(r"\.so(\.[0-9.]+)?$", path):
                yield Access(path, "m", call)  # mapped executable by the loader
            if "O_RDWR" in args:
                yield Access(path, "r", call)
        elif call == "connect" and "AF_UNIX" in args:
            yield Access(os.path.realpath(quoted[0]), "w", call)
        elif call == "inotify_add_watch":
            yield Access(os.path.realpath(quoted[0]).rstrip("/") + "/", "r", call)


TRACE = ["strace", "-f", "-qq", "-e", "trace=open,openat,execve,connect,inotify_add_watch"]
SYSTEM_PYTHON = Path("/usr/bin/python3")


@dataclass(frozen=True)
class Installation:
    launcher: Path
    #: Lines for local/passt-repair-python.vars that make the profile fit this installation.
    local: list[str]


def venv_installation(tmp_path: Path) -> Installation:
    """The installed command the tests run: a virtual environment; its prefix and base interpreter added locally."""
    launcher = Path(os.path.realpath(HELPER))
    prefix = launcher.parent.parent  # PREFIX/bin/passt-repair
    python = os.path.realpath(sys.base_prefix)
    return Installation(launcher, [f"@{{passt_repair_prefix}} += {prefix}", f"@{{passt_repair_python}} += {python}"])


def system_python_installation(tmp_path: Path) -> Installation:
    """The launcher and package under a prefix of their own (as /opt/passt-repair), run by the distribution's
    own interpreter: its standard library must be covered by the profile's defaults (only the prefix is added)."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"no {SYSTEM_PYTHON}")
    version = subprocess.run(
        [str(SYSTEM_PYTHON), "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if tuple(map(int, version.split("."))) < (3, 10):
        pytest.skip(f"{SYSTEM_PYTHON} is Python {version}, older than the package supports")
    prefix = tmp_path / "opt"
    (prefix / "bin").mkdir(parents=True)
    shutil.copy(os.path.realpath(HELPER), prefix / "bin" / "passt-repair")
    (prefix / "bin" / "python3").symlink_to(SYSTEM_PYTHON)
    package = Path(passt_repair.__file__).parent
    shutil.copytree(
        package,
        prefix / "lib" / f"python{version}" / "site-packages" / "passt_repair",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return Installation(prefix / "bin" / "passt-repair", [f"@{{passt_repair_prefix}} += {prefix}"])


@pytest.mark.parametrize("installation", [venv_installation, system_python_installation], ids=["venv", "system-python"])
def test_apparmor_profile_covers_what_the_helper_does(
    tmp_path: Path, installation: Callable[[Path], Installation]
) -> None:
    """strace the helper serving requests, once on passt's default socket path and once in directory mode
    on a directory added the documented way; every access must be granted by the profile."""
    need("strace", "strace")
    install = installation(tmp_path)
    watched = tmp_path / "vms"
    watched.mkdir()
    local = "\n".join(
        [*install.local, f"@{{passt_repair_sockets}} += {watched}/*.repair", f"@{{passt_repair_dirs}} += {watched}/"]
    )
    text = APPARMOR.read_text()
    variables = read_variables(text, local)
    rules = read_rules(text, variables)
    attachment = profile_body(text).split(" {", 1)[0]
    assert any(re.fullmatch(glob_to_regex(p), str(install.launcher)) for p in expand(attachment, variables))

    pairs = TcpPairs()
    logs = [tmp_path / "socket-mode.trace", tmp_path / "directory-mode.trace"]
    try:
        socks = pairs.make(3)
        fd, default = tempfile.mkstemp(prefix="passt_", suffix=".socket.repair", dir="/tmp")
        os.close(fd)
        os.unlink(default)  # passt's default location: /tmp/passt_N.socket, hence .socket.repair
        server = RawServer(Path(default))
        try:
            helper = _traced(install.launcher, default, logs[0])
            _serve(server, socks)
        finally:
            server.close()
            os.unlink(default)
        _assert_exited_cleanly(helper)

        helper = _traced(install.launcher, str(watched), logs[1])
        time.sleep(0.5)  # the helper starts watching; the socket comes later
        server = RawServer(watched / "vm.socket.repair")
        try:
            _serve(server, socks)
        finally:
            server.close()
        _assert_exited_cleanly(helper)
    finally:
        pairs.close()

    accesses = {a for log in logs for a in traced_accesses(log)}
    launched = {a for a in accesses if a.call == "execve" and a.path == str(install.launcher)}
    assert launched  # the launcher's own exec is the attachment, judged by the caller's profile
    interpreter = os.path.realpath(install.launcher.parent / "python3")
    assert Access(interpreter, "x", "execve") in accesses  # the interpreter of this installation ran
    assert any(a.path.startswith(f"{Path(interpreter).parent.parent}/lib/python3") for a in accesses)
    needed = accesses - launched
    assert {a.call for a in needed} >= {"execve", "openat", "connect", "inotify_add_watch"}
    bytecode = {a for a in needed if a.permission == "w" and "/__pycache__/" in a.path}
    assert all(denied_on_purpose(rules, a.path, "w") for a in bytecode), bytecode
    missing = sorted(
        f"{a.permission} {a.path} ({a.call})" for a in needed - bytecode if not allowed(rules, a.path, a.permission)
    )
    assert missing == [], "\n".join(missing)


def _traced(launcher: Path, target: str, log: Path) -> subprocess.Popen[str]:
    argv = [*TRACE, "-o", str(log), str(launcher), target]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_exited_cleanly(helper: subprocess.Popen[str]) -> None:
    try:
        _, err = helper.communicate(timeout=20)
    finally:
        helper.kill()
    assert helper.returncode == 0, err
    assert "error" not in err, err


def _serve(server: RawServer, socks: list[socket.socket]) -> None:
    server.accept()
    for command in (Command.ON, Command.OFF_NO_WP):
        assert server.request(command, [s.fileno() for s in socks]) == command.byte


# -- SELinux ---------------------------------------------------------------------------


def selinux_build(sources: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-f", str(SELINUX_MAKEFILE), "passt_repair_python.pp"],
        cwd=sources,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def selinux_sources(tmp_path: Path) -> Path:
    need("checkmodule", "checkpolicy")
    need("semodule_package", "semodule-utils")
    if not SELINUX_MAKEFILE.exists():
        pytest.skip(f"{SELINUX_MAKEFILE} is missing (Debian package selinux-policy-dev): no reference policy macros")
    if not have("make"):
        pytest.skip("make is not installed")
    for source in SELINUX.glob("passt_repair_python.*"):
        shutil.copy(source, tmp_path)
    return tmp_path


def test_selinux_module_compiles(selinux_sources: Path) -> None:
    """The reference policy's Makefile expands the macros, checkmodule compiles, semodule_package packages."""
    done = selinux_build(selinux_sources)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Creating default passt_repair_python.pp policy package" in done.stdout
    assert (selinux_sources / "passt_repair_python.pp").stat().st_size > 0


def test_selinux_build_rejects_a_broken_module(selinux_sources: Path) -> None:
    """checkmodule knows the policy's types: one that does not exist is an error, so a green build means something."""
    te = selinux_sources / "passt_repair_python.te"
    te.write_text(
        te.read_text().replace("passt_repair_python_socket_dir(var_run_t)", "passt_repair_python_socket_dir(no_such_t)")
    )
    done = selinux_build(selinux_sources)
    assert done.returncode != 0
    assert "unknown type no_such_t" in done.stdout + done.stderr


def test_selinux_module_grants_only_its_capabilities() -> None:
    te = (SELINUX / "passt_repair_python.te").read_text()
    grants = re.findall(r"^allow passt_repair_python_t self:(capability2?) \{ ([^}]*) \};", te, re.M)
    assert grants == [("capability", "net_admin setpcap")]
    fc = (SELINUX / "passt_repair_python.fc").read_text()
    labelled = re.findall(r"^(/\S+)\s+--\s+gen_context\(system_u:object_r:(\w+),s0\)", fc, re.M)
    assert labelled == [
        ("/usr/bin/passt-repair", "passt_repair_python_exec_t"),
        ("/usr/local/bin/passt-repair", "passt_repair_python_exec_t"),
    ]
