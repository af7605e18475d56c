# SPDX-License-Identifier: GPL-2.0-or-later
"""contrib/systemd/passt-repair@.service: systemd accepts it, and the helper works inside its sandbox.

systemd is not PID 1 on the test hosts, so the sandbox is rebuilt from its
parts: a mount and network namespace with the socket's directory mounted
read-only (ProtectSystem=strict, PrivateNetwork=yes), CAP_NET_ADMIN as the
only capability (the capability settings), the seccomp rules of
MemoryDenyWriteExecute=, RestrictAddressFamilies= and SystemCallArchitectures=
(systemd_sandbox.py), and the interpreter started as ExecStart= starts it.
"""

from __future__ import annotations

import configparser
import errno
import importlib.resources
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from passt_repair.protocol import Command
from support import HELPER, SETPRIV_NET_ADMIN_ONLY, Helper, RawServer, TcpPairs, have, states

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "passt-repair@.service"
SANDBOX = Path(__file__).with_name("systemd_sandbox.py")
needs_analyze = pytest.mark.skipif(not have("systemd-analyze"), reason="systemd-analyze is not installed")


def unit_settings() -> dict[str, list[str]]:
    """Every Key= of the unit, with all its values in order."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_parses_and_grants_only_net_admin() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service"]
    s = unit_settings()
    assert s["AmbientCapabilities"] == s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateNetwork", "MemoryDenyWriteExecute", "LockPersonality"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert "PrivateUsers" not in s  # the capability must count in the sockets' user namespace
    assert s["ExecStart"] == ["/usr/bin/passt-repair -- %f"]  # the isolating launcher, as installed


@needs_analyze
@pytest.mark.parametrize("instance", ["", "run-passt-vm1\\x2da.repair", "run-vms-vm1"])
def test_systemd_analyze_verify(tmp_path: Path, instance: str) -> None:
    """No complaint at all, the man page of Documentation= included (found where the package installed it).

    ExecStart= names /usr/bin/passt-repair, where a distribution installs the launcher; systemd-analyze
    checks that the program exists, so the copy verified here names the launcher installed for the tests.
    """
    (tmp_path / "man1").mkdir()
    with importlib.resources.as_file(importlib.resources.files("passt_repair") / "passt-repair.1") as man:
        shutil.copy(man, tmp_path / "man1" / "passt-repair.1")
    unit = tmp_path / f"passt-repair@{instance}.service"
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/passt-repair " in text
    (tmp_path / "passt-repair@.service").write_text(text.replace("=/usr/bin/passt-repair ", f"={HELPER} "))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit if instance else tmp_path / "passt-repair@.service")],
        capture_output=True,
        text=True,
        env={**os.environ, "MANPATH": str(tmp_path)},
        timeout=60,
    )
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@needs_analyze
def test_escaped_instance_gives_back_the_path() -> None:
    """What %f receives: the instance name unescaped as a path, dashes and all."""
    path = "/run/passt-vms/vm 1.repair"
    name = subprocess.run(
        ["systemd-escape", "--template=passt-repair@.service", "--path", path], capture_output=True, text=True
    ).stdout.strip()
    instance = name.removeprefix("passt-repair@").removesuffix(".service")
    back = subprocess.run(["systemd-escape", "--unescape", "--path", instance], capture_output=True, text=True)
    assert back.stdout.strip() == path


@needs_analyze
def test_helper_system_calls_pass_the_unit_filter(tmp_path: Path, pairs: TcpPairs) -> None:
    """Every system call the helper makes, in both modes, is allowed by the unit's SystemCallFilter=."""
    allowed = _unit_syscall_filter()
    trace = tmp_path / "trace"
    directory = tmp_path / "d"
    directory.mkdir()
    server = RawServer(directory / "s.repair")
    socks = pairs.make(3)
    for target in (server.path, directory):
        helper = Helper("--debug", str(target), prefix=["strace", "-f", "-qq", "-o", str(trace)])
        try:
            server.accept()
            assert server.request(Command.ON, [s.fileno() for s in socks]) == Command.ON.byte
            assert server.conn is not None
            server.conn.close()
            assert helper.wait() == 0
        finally:
            helper.kill()
        used = set(re.findall(r"^\d+ +([a-z0-9_]+)\(", trace.read_text(), re.M))
        used -= {"execve"}  # the exec into the helper is the manager's, before the filter
        assert used - allowed == set(), f"system calls outside SystemCallFilter= ({target})"
    server.close()


def _unit_syscall_filter() -> set[str]:
    """The unit's SystemCallFilter= lines, applied in order, with groups expanded by systemd-analyze."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True).stdout
    groups: dict[str, list[str]] = {}
    current = ""
    for line in listing.splitlines():
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if not line.startswith(" "):
            current = word
            groups[current] = []
        elif current:
            groups[current].append(word)

    def expand(names: list[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            out |= expand(groups[name]) if name.startswith("@") else {name}
        return out

    allowed: set[str] = set()
    for value in unit_settings()["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    assert "setsockopt" in allowed
    return allowed


# -- the helper inside the sandbox ---------------------------------------------------


def sandboxed(readonly: Path) -> list[str]:
    """The command prefix that rebuilds the unit's sandbox, with `readonly` mounted read-only."""
    mount_ro = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return [
        "unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", mount_ro, str(readonly),
        *SETPRIV_NET_ADMIN_ONLY, sys.executable, str(SANDBOX),
    ]  # fmt: skip


class Unit:
    """The helper as the unit starts it (ExecStart=: the launcher beside the tests' interpreter), in the sandbox."""

    def __init__(self, sandbox_root: Path, target: Path) -> None:
        argv = [*sandboxed(sandbox_root), str(HELPER), "--", str(target)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr = ""

    def wait(self) -> int:
        _, self.stderr = self.proc.communicate(timeout=20)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def sandbox_ok() -> None:
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("systemd_sandbox.py knows the system call numbers of x86_64 and aarch64 only")


def test_sandbox_is_real(sandbox_ok: None, tmp_path: Path) -> None:
    """The rebuilt sandbox refuses what the unit refuses (else the next tests prove nothing)."""
    probe = (
        "import mmap, os, socket\n"
        "for attempt in (lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC),\n"
        "                lambda: socket.socket(socket.AF_INET6),\n"
        "                lambda: open(os.path.join(os.environ['DIR'], 'f'), 'w'),\n"
        "                lambda: os.chown(os.environ['DIR'], 1, 1)):\n"
        "    try:\n"
        "        attempt()\n"
        "        print('allowed')\n"
        "    except OSError as e:\n"
        "        print(e.errno)\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
        "print(sum(1 for line in open('/proc/net/dev')) - 2)\n"
    )
    r = subprocess.run(
        [*sandboxed(tmp_path), sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "DIR": str(tmp_path)},
        timeout=60,
    )
    lines = r.stdout.split()
    assert lines == [
        str(errno.EPERM),
        str(errno.EAFNOSUPPORT),
        str(errno.EROFS),
        str(errno.EROFS),
        "0000000000001000",
        "1",
    ]


@pytest.mark.parametrize("mode", ["socket", "directory"])
def test_helper_in_the_sandbox(sandbox_ok: None, tmp_path: Path, pairs: TcpPairs, mode: str) -> None:
    """The helper of ExecStart= switches sockets in the unit's sandbox, in both modes (directory mode uses ctypes)."""
    directory = tmp_path / "run"
    directory.mkdir()
    target = directory if mode == "directory" else directory / "vm1.repair"
    server = None if mode == "directory" else RawServer(directory / "vm1.repair")
    helper = Unit(directory, target)
    try:
        if server is None:
            server = RawServer(directory / "vm1.repair")
        server.accept()
        socks = pairs.make(5)
        assert server.request(Command.ON, [s.fileno() for s in socks]) == Command.ON.byte
        assert states(socks) == [1] * 5
        assert server.request(Command.OFF_NO_WP, [s.fileno() for s in socks]) == Command.OFF_NO_WP.byte
        assert states(socks) == [0] * 5
        assert server.conn is not None
        server.conn.close()
        assert helper.wait() == 0, helper.stderr
    finally:
        helper.kill()
        if server is not None:
            server.close()


def _grant(path: Path, uid: int, perms: int) -> None:
    """setfacl -m u:UID:PERMS PATH, without setfacl: the POSIX ACL xattr, version 2."""
    mode = path.stat().st_mode
    entries = [
        (0x01, (mode >> 6) & 7, 0xFFFFFFFF),  # owner
        (0x02, perms, uid),  # the named user
        (0x04, (mode >> 3) & 7, 0xFFFFFFFF),  # owning group
        (0x10, perms | ((mode >> 3) & 7), 0xFFFFFFFF),  # mask
        (0x20, mode & 7, 0xFFFFFFFF),  # others
    ]
    os.setxattr(
        path, "system.posix_acl_access", struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    )


@pytest.mark.parametrize("granted", [True, False])
def test_socket_of_another_user_needs_a_grant(sandbox_ok: None, tmp_path: Path, granted: bool) -> None:
    """With CAP_NET_ADMIN only, the helper reaches another user's 0600 socket only through the ACL the unit's
    comment describes (uid 0 stands for the passt-repair user: it keeps no CAP_DAC_OVERRIDE here)."""
    directory = tmp_path / "run"
    directory.mkdir()
    server = RawServer(directory / "vm1.repair")
    os.chown(server.path, 65534, 65534)
    os.chmod(server.path, 0o600)
    if granted:
        try:
            _grant(server.path, 0, 0o6)
        except OSError as e:
            pytest.skip(f"no POSIX ACLs on this file system: {e}")
    helper = Unit(directory, server.path)
    try:
        if granted:
            server.accept()
            assert server.conn is not None
            server.conn.close()
            assert helper.wait() == 0
        else:
            assert helper.wait() == 1
            assert "connect" in helper.stderr
            assert "EACCES" in helper.stderr
    finally:
        helper.kill()
        server.close()


def test_isolated_interpreter_ignores_the_environment(tmp_path: Path) -> None:
    """A PYTHONPATH that shadows passt_repair is not used by the ExecStart= command (the launcher)."""
    fake = tmp_path / "passt_repair"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('the fake package was imported')\n")
    (fake / "__main__.py").write_text("raise SystemExit('the fake package was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([str(HELPER), "--version"], capture_output=True, text=True, env=env)
    assert (r.returncode, r.stdout.startswith("passt-repair ")) == (0, True), r.stderr
    shadowed = subprocess.run(
        [sys.executable, "-m", "passt_repair", "--version"], capture_output=True, text=True, env=env
    )
    assert "fake package" in shadowed.stderr  # without -I it would be
