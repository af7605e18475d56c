# SPDX-License-Identifier: GPL-2.0-or-later
"""docs/deployment.md against the installed helper: every passt-repair command it shows runs as written
(its paths moved under a temporary directory), KubeVirt's layout works as virt-handler sets it up, and
every file of this project the recipes name exists. The distribution recipe is run in
tests/test_packaging.py, on the unpacked sdist.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from passt_repair import Command, RepairServer, repair_state
from support import HELPER, TcpPairs

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "docs" / "deployment.md"
#: Files of this project that land with the MAC profiles (contrib/apparmor/, contrib/selinux/).
PROFILES = ("contrib/apparmor/", "contrib/selinux/")


def shell_lines() -> list[str]:
    blocks = re.findall(r"^ *```sh\n(.*?)^ *```$", RECIPES.read_text(), re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def helper_commands() -> list[list[str]]:
    return [shlex.split(line) for line in shell_lines() if line.startswith("passt-repair ")]


def test_recipes_show_helper_commands() -> None:
    assert len(helper_commands()) >= 1
    assert any(line.startswith("systemctl start ") for line in shell_lines())


@pytest.mark.parametrize("argv", helper_commands(), ids=lambda argv: argv[-1])
def test_helper_command_runs_as_written(tmp_path: Path, argv: list[str]) -> None:
    """The command, with its socket moved into a temporary directory of the same file name."""
    path = Path(argv[-1])
    moved = tmp_path / path.name
    with RepairServer(moved) as server:
        helper = subprocess.Popen([str(HELPER), *argv[1:-1], str(moved)], stderr=subprocess.PIPE, text=True)
        server.accept(timeout=10)
        server.detach()
        _, err = helper.communicate(timeout=10)
    assert (helper.returncode, err.count("\n")) == (0, 1), err
    assert " connected to " in err


def test_systemctl_instance_name_round_trips() -> None:
    """The unit instance the libvirt recipe starts names the socket path, dashes and all."""
    (line,) = [line for line in shell_lines() if line.startswith("systemctl start ")]
    inner = re.fullmatch(r'systemctl start "\$\((.*)\)"', line)
    assert inner
    argv = shlex.split(inner[1])
    assert argv[0] == "systemd-escape"
    unit = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    assert unit.startswith("passt-repair@")
    assert unit.endswith(".service")
    instance = unit.removeprefix("passt-repair@").removesuffix(".service")
    back = subprocess.run(
        ["systemd-escape", "--unescape", "--path", instance], capture_output=True, text=True, check=True, timeout=20
    ).stdout.strip()
    assert back == argv[-1]
    assert (ROOT / "contrib" / "systemd" / "passt-repair@.service").is_file()


def test_every_project_file_the_recipes_name_exists() -> None:
    text = RECIPES.read_text()
    named = set()
    for found in re.findall(r"`((?:contrib|docs|bin|tests)/[\w./@{},-]+)`", text):
        if m := re.fullmatch(r"(.*)\{(.*)\}(.*)", found):
            named |= {f"{m[1]}{part}{m[3]}" for part in m[2].split(",")}
        else:
            named.add(found)
    assert named
    missing = {name for name in named if not (ROOT / name).exists()}
    if missing and all(name.startswith(PROFILES) for name in missing):
        pytest.skip(f"the MAC profiles are not in this tree yet: {sorted(missing)}")
    assert missing == set()


# -- KubeVirt's layout ---------------------------------------------------------------------


@pytest.fixture
def pod() -> Iterator[tuple[Path, Path]]:
    """virt-handler's view of a virt-launcher pod: the passt directory, and the short link to it.

    Under a short directory of /tmp, as /pods is short: pytest's own tmp_path is too long for the link.
    """
    top = Path(tempfile.mkdtemp(prefix="kv", dir="/tmp"))
    uid = "289c1d09-9552-46ba-ba87-11c5c00692f3"
    real = top / "pods" / uid / "volumes" / "kubernetes.io~empty-dir" / "libvirt-runtime" / "qemu" / "run" / "passt"
    real.mkdir(parents=True)
    link = top / "pods" / uid / "p"
    link.symlink_to(real)
    yield real, link
    shutil.rmtree(top)


SOCKET = "1-vmi-fedora-default.socket.repair"


def switch_once(server: RepairServer, pairs: TcpPairs) -> None:
    sock = pairs.make(1)[0]
    with server.repair([sock]):
        assert repair_state(sock)
    assert not repair_state(sock)


def test_kubevirt_target_waits_in_the_linked_directory(pod: tuple[Path, Path], pairs: TcpPairs) -> None:
    real, link = pod
    assert len(str(real / SOCKET)) > 107  # why virt-handler makes the link
    helper = subprocess.Popen([str(HELPER), str(link)], stderr=subprocess.PIPE, text=True)
    try:
        with RepairServer(link / SOCKET) as server:  # passt comes later, and binds in its own (short) view
            server.accept(timeout=10)
            switch_once(server, pairs)
            server.detach()
        _, err = helper.communicate(timeout=10)
    finally:
        helper.kill()
    assert helper.returncode == 0, err


@pytest.mark.parametrize("wrapped", [False, True], ids=["link", "wrapper"])
def test_kubevirt_source_connects_through_the_link(
    pod: tuple[Path, Path], pairs: TcpPairs, tmp_path: Path, wrapped: bool
) -> None:
    """Given the socket found in the linked directory; also through the two-line wrapper of the recipe."""
    _, link = pod
    command = [str(HELPER)]
    if wrapped:
        wrapper = tmp_path / "passt-repair"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(str(HELPER))} --peer-uid owner "$@"\n')
        wrapper.chmod(0o755)
        command = [str(wrapper)]
    with RepairServer(link / SOCKET) as server:
        helper = subprocess.Popen([*command, str(link / SOCKET)], stderr=subprocess.PIPE, text=True)
        server.accept(timeout=10)
        switch_once(server, pairs)
        server.detach()
        _, err = helper.communicate(timeout=10)
    assert helper.returncode == 0, err


def test_kubevirt_real_path_is_too_long_for_the_helper(pod: tuple[Path, Path]) -> None:
    """Without the link the socket path does not fit in sun_path: a usage error, exit status 2, one line."""
    real, link = pod
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(link / SOCKET))
        listener.listen(1)
        r = subprocess.run([str(HELPER), str(real / SOCKET)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def test_kubevirt_kill_while_waiting_changes_nothing(pod: tuple[Path, Path], pairs: TcpPairs) -> None:
    """virt-handler's 60 s context ends in SIGKILL: a helper still waiting for passt leaves nothing behind."""
    _, link = pod
    helper = subprocess.Popen([str(HELPER), str(link)], stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            helper.wait(timeout=0.5)  # waiting in directory mode
    finally:
        helper.kill()
        helper.communicate(timeout=10)
    assert list(link.iterdir()) == []
    with RepairServer(link / SOCKET) as server:  # the next helper for the same pod works as the first would
        fresh = subprocess.Popen([str(HELPER), str(link / SOCKET)], stderr=subprocess.PIPE, text=True)
        server.accept(timeout=10)
        server.switch(pairs.make(2), Command.OFF_NO_WP)
        server.detach()
        assert fresh.wait(timeout=10) == 0
