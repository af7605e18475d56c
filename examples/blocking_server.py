# SPDX-License-Identifier: GPL-2.0-or-later
"""Switch repair mode on some TCP sockets through passt-repair, with the blocking API.

Run it with the interpreter the package is installed for, as root (the
helper needs CAP_NET_ADMIN); after the README's set-up:

    .venv/bin/python examples/blocking_server.py

It starts the helper itself, `passt-repair SOCKET`, from beside that
interpreter; a real deployment starts the helper from systemd or an
orchestrator instead. Without the capability the helper says so and exits 1
at once, and so does this program.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from passt_repair import Command, HelperInfo, NoHelperError, RepairError, RepairServer, repair_state


def helper_command() -> str | None:
    """passt-repair installed beside this interpreter (a virtual environment's bin/), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "passt-repair")
    return beside if os.access(beside, os.X_OK) else shutil.which("passt-repair")


def connected_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """n connected loopback TCP pairs: (our ends, their peers)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours, peers = [], []
        for _ in range(n):
            ours.append(socket.create_connection(listener.getsockname()))
            peers.append(listener.accept()[0])
    return ours, peers


def wait_for_helper(server: RepairServer, helper: subprocess.Popen[bytes], timeout: float) -> HelperInfo | None:
    """The helper, once connected; None if it exited first (it has said why on stderr)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return server.accept(timeout=0.05)
        except NoHelperError:
            if helper.poll() is not None:
                return None
            if time.monotonic() > deadline:
                raise


def main() -> int:
    command = helper_command()
    if command is None:
        print("no passt-repair beside this interpreter or on PATH: install the package", file=sys.stderr)
        return 1
    ours, peers = connected_pairs(300)
    try:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "example.repair")
            with RepairServer(path, attach_timeout=5.0) as server:
                helper = subprocess.Popen([command, path])
                try:
                    info = wait_for_helper(server, helper, timeout=10)
                    if info is None:
                        print(f"the helper exited with status {helper.returncode} without connecting", file=sys.stderr)
                        return 1
                    print(f"helper attached: pid {info.pid}, uid {info.uid}")
                    with server.repair(ours):  # 300 sockets: two messages, 253 and 47
                        assert all(repair_state(s) for s in ours)
                        print("repair mode is on for", len(ours), "sockets")
                    assert not any(repair_state(s) for s in ours)
                    server.queue(ours[0], Command.ON)  # passt's way: queue, then flush before the step
                    server.flush()
                    server.switch([ours[0]], Command.OFF_NO_WP)
                except RepairError as e:
                    print(f"switching failed: {e}", file=sys.stderr)
                    return 1
                finally:
                    server.detach()  # the helper sees end of file and exits 0
                    helper.wait(timeout=10)
    finally:
        for s in ours + peers:
            s.close()
    print("helper exit status", helper.returncode)
    return helper.returncode


if __name__ == "__main__":
    sys.exit(main())
