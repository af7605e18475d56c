# SPDX-License-Identifier: GPL-2.0-or-later
"""Before timing anything: every helper that claims the all-or-nothing guarantee must keep it.

A benchmark that compares a helper doing less work would flatter it, so each
helper is first given one good request of three sockets, then one that fails
halfway, on the same descriptor numbers (a socket already in repair mode,
one that is not, then a listening socket, where setsockopt(TCP_REPAIR) fails
with EPERM). It must close the connection without a reply and leave both
sockets as they were. Helpers that do not claim the guarantee (kind.exact
false) only get the good request.
"""

from __future__ import annotations

import array
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import SOL_TCP, TCP_REPAIR, Attached, HelperKind, TcpPool, wait_readable


class BrokenHelper(Exception):
    pass


def check(kind: HelperKind) -> None:
    """Raise BrokenHelper unless `kind` switches a good request and rolls back a failed one."""
    pool = TcpPool(3)
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    first, second, third = pool.clients
    try:
        with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
            helper = Attached(kind, Path(tmp))
            try:
                if _request(helper.conn, 1, pool.fds) != b"\x01" or _states(pool) != [1, 1, 1]:
                    raise BrokenHelper(f"{kind.label}: a good request did not switch its sockets")
                if not kind.exact:
                    return
                second.setsockopt(SOL_TCP, TCP_REPAIR, -1)
                third.setsockopt(SOL_TCP, TCP_REPAIR, -1)
                reply = _request(helper.conn, 1, [first.fileno(), second.fileno(), listening.fileno()])
                if reply:
                    raise BrokenHelper(f"{kind.label}: replied {reply!r} to a request that cannot succeed")
                if _states(pool) != [1, 0, 0]:
                    raise BrokenHelper(f"{kind.label}: a failed request left sockets changed: {_states(pool)}")
            finally:
                status, _ = helper.stop()
            if status != 1:
                raise BrokenHelper(f"{kind.label}: exit status {status} after a failed request, not 1")
    finally:
        for s in pool.clients:
            s.setsockopt(SOL_TCP, TCP_REPAIR, -1)
        listening.close()
        pool.close()


def _states(pool: TcpPool) -> list[int]:
    return [s.getsockopt(SOL_TCP, TCP_REPAIR) for s in pool.clients]


def _request(conn: socket.socket, command: int, fds: Sequence[int]) -> bytes:
    conn.sendmsg([bytes([command & 0xFF])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    wait_readable(conn, 20, "self-check reply")
    try:
        return conn.recv(16)
    except ConnectionResetError:
        return b""
