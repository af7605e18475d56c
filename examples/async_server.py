"""The same as blocking_server.py, in an asyncio program: no threads.

Run as root; it starts the helper itself in directory mode, before the
server exists, the way an orchestrator does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile

from passt_repair import AsyncRepairServer, Command, RepairError, repair_state


def connected_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """n connected loopback TCP pairs: (our ends, their peers)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours, peers = [], []
        for _ in range(n):
            ours.append(socket.create_connection(listener.getsockname()))
            peers.append(listener.accept()[0])
    return ours, peers


async def main() -> int:
    helper_command = shutil.which("passt-repair") or "passt-repair"
    ours, peers = connected_pairs(300)
    with tempfile.TemporaryDirectory() as directory:
        # Directory mode: the helper waits for a *.repair socket to appear in `directory`.
        helper = await asyncio.create_subprocess_exec(helper_command, directory)
        async with AsyncRepairServer(os.path.join(directory, "vm1.repair")) as server:
            try:
                info = await server.accept(timeout=10)
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
    for s in ours + peers:
        s.close()
    print("helper exit status", helper.returncode)
    return helper.returncode or 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
