# SPDX-License-Identifier: GPL-2.0-or-later
"""Live TCP connection migration built on TCP_REPAIR.

    from passt_repair.tcp import checkpoint, restore, resume, encode, decode

    frozen = checkpoint(sockets, server)          # source: repair on, dump
    data = encode(frozen.states)                  # bytes for the target
    restored = restore(decode(data), server)      # target: new sockets, in repair mode
    resume(restored, server)                      # repair off: the connections go on

`server` is a connected `passt_repair.server.RepairServer` (the helper holds
CAP_NET_ADMIN), or `DirectSwitcher()` in a process that holds it itself.
The order of steps that loses nothing between hosts is in `migrate` and
docs/migration.md.
"""

from .dump import DumpError, dump
from .migrate import (
    Checkpoint,
    DirectSwitcher,
    Failure,
    Restored,
    StepError,
    Switcher,
    checkpoint,
    restore,
    resume,
    stream_buffer,
    thaw,
)
from .restore import RestoreError
from .state import ConnectionState, RecordError, RepairWindow, SocketOptions, TcpState, check
from .wire import decode, encode

__all__ = [
    "Checkpoint",
    "ConnectionState",
    "DirectSwitcher",
    "DumpError",
    "Failure",
    "RecordError",
    "RepairWindow",
    "RestoreError",
    "Restored",
    "SocketOptions",
    "StepError",
    "Switcher",
    "TcpState",
    "check",
    "checkpoint",
    "decode",
    "dump",
    "encode",
    "restore",
    "resume",
    "stream_buffer",
    "thaw",
]
