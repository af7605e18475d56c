# SPDX-License-Identifier: GPL-2.0-or-later
"""The same as blocking_server.py, in an asyncio program: no threads.

Run it as root with the interpreter the package is installed for:

    .venv/bin/python examples/async_server.py

It starts the helper itself in directory mode, before the server exists,
the way an orchestrator does. Without CAP_NET_ADMIN the helper says so and
exits 1 at once, and so does this program.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile

from passt_repair import AsyncRepairServer, Command, HelperInfo, RepairError, repair_state


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


async def wait_for_helper(
    server: AsyncRepairServer, helper: asyncio.subprocess.Process, timeout: float
) -> HelperInfo | None:
    """The helper, once connected; None if it exited first (it has said why on stderr)."""
    accepting = asyncio.ensure_future(server.accept(timeout=timeout))
    exiting = asyncio.ensure_future(helper.wait())
    await asyncio.wait([accepting, exiting], return_when=asyncio.FIRST_COMPLETED)
    if accepting.done():
        exiting.cancel()
        return accepting.result()
    accepting.cancel()
    return None


async def main() -> int:
    command = helper_command()
    if command is None:
        print("no passt-repair beside this interpreter or on PATH: install the package", file=sys.stderr)
        return 1
    ours, peers = connected_pairs(300)
    try:
        with tempfile.TemporaryDirectory() as directory:
            # Directory mode: the helper waits for a *.repair socket to appear in `directory`.
            helper = await asyncio.create_subprocess_exec(command, directory)
            async with AsyncRepairServer(os.path.join(directory, "vm1.repair")) as server:
                try:
                    info = await wait_for_helper(server, helper, timeout=10)
                    if info is None:
                        print(f"the helper exited with status {helper.returncode} without connecting", file=sys.stderr)
                        return 1
                    print(f"helper attached: pid {info.pid}, uid {info.uid}")
                    async with server.repair(ours, off=Command.OFF_NO_WP):
                        assert all(repair_state(s) for s in ours)
                        print("repair mode is on for", len(ours), "sockets")
                    assert not any(repair_state(s) for s in ours)
                except RepairError as e:
                    print(f"switching failed: {e}", file=sys.stderr)
                    return 1
                finally:
                    server.detach()
                    await asyncio.wait_for(helper.wait(), 10)
    finally:
        for s in ours + peers:
            s.close()
    print("helper exit status", helper.returncode)
    return helper.returncode or 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
