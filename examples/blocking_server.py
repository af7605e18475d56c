"""Switch repair mode on some TCP sockets through passt-repair, with the blocking API.

Run as root (or with CAP_NET_ADMIN for the helper): it starts the helper
itself, as `passt-repair SOCKET`; a real deployment starts the helper from
systemd or an orchestrator instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

from passt_repair import Command, RepairError, RepairServer, repair_state


def connected_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """n connected loopback TCP pairs: (our ends, their peers)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours, peers = [], []
        for _ in range(n):
            ours.append(socket.create_connection(listener.getsockname()))
            peers.append(listener.accept()[0])
    return ours, peers


def main() -> int:
    helper_command = shutil.which("passt-repair") or "passt-repair"
    ours, peers = connected_pairs(300)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "example.repair")
        with RepairServer(path, attach_timeout=5.0) as server:
            helper = subprocess.Popen([helper_command, path])
            try:
                info = server.accept(timeout=10)
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
    for s in ours + peers:
        s.close()
    print("helper exit status", helper.returncode)
    return helper.returncode


if __name__ == "__main__":
    sys.exit(main())
