"""EXPERIMENT, not the shipped helper: passt-repair's request loop with the per-message work cut down.

It measures what changes to `serve()` in src/passt_repair/helper.py would
buy; docs/performance.md reports the figures. It connects with the shipped
code and speaks the same protocol. A well-formed request whose descriptors
are the contiguous block the socket table expects (the normal case: the
helper opens nothing while it serves) takes a fast path; anything else goes
through the shipped functions, so errors and rollback are exactly the
shipped ones.

Variants (--variant):
  lean      the fast path with the same guarantee as the shipped helper: the
            prior state of every socket is read before any is changed, and a
            failure puts back the ones already changed.
  noprior   the fast path WITHOUT the prior read: a failure halfway cannot put
            the sockets back as they were. Not a candidate; it only shows what
            the exact rollback costs.

Usage: PYTHON lean_helper.py [--variant lean|noprior] PATH
(the installed command's main(), with serve() replaced: connecting, logging, exit codes and
anything else the command does around the loop stay the shipped ones)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from itertools import repeat
from socket import SCM_RIGHTS, SOL_SOCKET, socket

from passt_repair import cli, helper
from passt_repair.protocol import SCM_MAX_FD, SOL_TCP, TCP_REPAIR, decode_command

#: Request bytes as received (unsigned) -> (value for setsockopt, the reply to send).
_COMMANDS = {1: (1, b"\x01"), 0: (0, b"\x00"), 255: (-1, b"\xff")}
_getsockopt: Callable[..., int] = socket.getsockopt
_setsockopt: Callable[..., None] = socket.setsockopt


def serve(conn: socket, exact: bool) -> None:
    """The shipped serve(), with a fast path for well-formed requests on the expected descriptors."""
    stop = helper._stop
    table = helper._SocketTable()
    buf = bytearray(2)
    buffers = [buf]
    recvmsg_into = conn.recvmsg_into
    send = conn.send
    anc_space = helper._ANC_SPACE
    level_6, option_19 = repeat(SOL_TCP), repeat(TCP_REPAIR)
    # The descriptors base, base+1, ... as the kernel writes them in SCM_RIGHTS: a request whose data
    # is a prefix of this is the contiguous block the table holds views for.
    block = b""
    views: list[socket] = table._views  # grows as the shipped path meets new descriptor numbers
    try:
        while not stop.requested:
            try:
                stop.waiting = True
                nbytes, ancillary, flags, _ = recvmsg_into(buffers, anc_space)
            except ConnectionResetError:
                return
            except OSError as e:
                raise helper.HelperError(helper._oserror("recvmsg", e)) from None
            finally:
                stop.waiting = False
            if nbytes == 1 and not flags and len(ancillary) == 1 and buf[0] in _COMMANDS:
                level, kind, data = ancillary[0]
                n = len(data) >> 2
                if level == SOL_SOCKET and kind == SCM_RIGHTS and 0 < n <= len(views) and data == block[: len(data)]:
                    value, reply = _COMMANDS[buf[0]]
                    mine = views[:n]
                    try:
                        if exact:
                            prior = list(map(_getsockopt, mine, level_6, option_19))
                        remaining = iter(mine)
                        try:
                            any(map(_setsockopt, remaining, level_6, option_19, repeat(value)))
                        except OSError:
                            if not exact:
                                raise helper.HelperError(
                                    "setsockopt(TCP_REPAIR) failed; sockets left changed"
                                ) from None
                            position = n - sum(1 for _ in remaining) - 1
                            stuck = helper._restore(mine, prior)
                            raise helper.HelperError(
                                f"descriptor {position + 1}: setsockopt failed ({stuck} stuck)"
                            ) from None
                    except OSError:
                        _slow_error(table, data, buf[0])
                    finally:
                        os.closerange(table.base, table.base + n)
                    send(reply)
                    continue
            fds, other = helper._received_fds(ancillary)
            try:
                if nbytes == 0 and not fds:
                    return
                command = helper._check(nbytes, buf, flags, fds, other)
                helper._apply(table, fds, command)
            finally:
                helper._close_all(fds)
            if table.base >= 0 and not block:
                block = b"".join(fd.to_bytes(4, sys.byteorder) for fd in range(table.base, table.base + SCM_MAX_FD))
            send(buf[:1])
    finally:
        table.close()


def _slow_error(table: helper._SocketTable, data: bytes, raw: int) -> None:
    """A prior read failed (not a TCP socket): the shipped code names the descriptor; nothing changed."""
    fds = [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, len(data), 4)]
    helper._apply(table, fds, decode_command(raw))


def main() -> int:
    """The installed command with this serve() in place of the shipped one; everything else is shipped."""
    args = sys.argv[1:]
    exact = True
    if args[:2] == ["--variant", "noprior"]:
        exact, args = False, args[2:]
    elif args[:2] == ["--variant", "lean"]:
        args = args[2:]

    def lean_serve(conn: socket, log: helper.Log, debug: helper.Log | None = None) -> None:
        serve(conn, exact)

    helper.serve = lean_serve  # run() looks serve up at call time
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
