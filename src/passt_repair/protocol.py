# SPDX-License-Identifier: GPL-2.0-or-later
"""The passt-repair wire protocol, with no I/O.

A request is one byte, a signed 8-bit command (the kernel's own TCP_REPAIR
values), sent together with one SCM_RIGHTS control message of 1 to 253
descriptors. The helper applies the command to every descriptor and answers
with the same byte and no control message; on failure it closes the
connection instead. This module holds the constants, the encoding, the
checks both sides make on a message, and the server's batching rule.
Everything here is a pure function of its arguments, so it is tested
without sockets; the socket calls live in `helper` and `server`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator

__all__ = [
    "SCM_MAX_FD",
    "SOL_TCP",
    "TCP_REPAIR",
    "Batch",
    "BatchQueue",
    "Command",
    "ProtocolError",
    "batches",
    "decode_command",
    "encode_command",
    "undo_command",
]

#: The kernel's limit of descriptors in one SCM_RIGHTS message (include/net/scm.h).
SCM_MAX_FD = 253
#: Socket option level and name (include/uapi/linux/tcp.h).
SOL_TCP = 6
TCP_REPAIR = 19


class Command(enum.IntEnum):
    """A request byte: the value the helper passes to setsockopt(TCP_REPAIR)."""

    ON = 1
    OFF = 0
    #: Off without sending a window probe to the peer.
    OFF_NO_WP = -1

    @property
    def byte(self) -> bytes:
        """The command as it travels: one signed byte."""
        return _ENCODED[self]


_ENCODED = {cmd: (cmd & 0xFF).to_bytes(1, "little") for cmd in Command}
_DECODED = {enc[0]: cmd for cmd, enc in _ENCODED.items()}


class ProtocolError(ValueError):
    """A message or reply that breaks the protocol."""


def encode_command(cmd: Command | int) -> bytes:
    """Return the one-byte encoding of `cmd`; raise ProtocolError if it is not a command."""
    try:
        return Command(cmd).byte
    except ValueError:
        raise ProtocolError(f"unsupported command {cmd!r} (expected 1, 0 or -1)") from None


def decode_command(raw: int) -> Command:
    """Return the Command for the unsigned byte value `raw`; raise ProtocolError otherwise."""
    try:
        return _DECODED[raw]
    except KeyError:
        signed = raw - 256 if raw > 127 else raw
        raise ProtocolError(f"unsupported command byte {signed} (expected 1, 0 or -1)") from None


def undo_command(state: int) -> Command:
    """The command that puts a socket back into TCP_REPAIR state `state` (0 or 1).

    Turning repair off to undo a change never sends a window probe: the
    socket is put back as it was, and nothing reaches the peer.
    """
    return Command.ON if state else Command.OFF_NO_WP


class Batch:
    """One request: a command and the descriptors it applies to (1 to SCM_MAX_FD)."""

    __slots__ = ("command", "fds")

    def __init__(self, command: Command, fds: tuple[int, ...]) -> None:
        if not 1 <= len(fds) <= SCM_MAX_FD:
            raise ProtocolError(f"a message carries 1 to {SCM_MAX_FD} descriptors, not {len(fds)}")
        self.command = command
        self.fds = fds

    def __repr__(self) -> str:
        return f"Batch({self.command.name}, {len(self.fds)} descriptors)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Batch) and (self.command, self.fds) == (other.command, other.fds)

    __hash__ = None  # type: ignore[assignment]


def batches(command: Command, fds: Iterable[int]) -> Iterator[Batch]:
    """Split `fds` into requests of at most SCM_MAX_FD descriptors, in order."""
    chunk: list[int] = []
    for fd in fds:
        chunk.append(fd)
        if len(chunk) == SCM_MAX_FD:
            yield Batch(command, tuple(chunk))
            chunk = []
    if chunk:
        yield Batch(command, tuple(chunk))


class BatchQueue:
    """The server's queue-and-flush rule (what passt does), without the sending.

    `add` queues a descriptor with its command and returns the batch that
    must be sent first, if any: the queued batch when the command changes,
    or the full batch once SCM_MAX_FD descriptors are queued. `take` empties
    the queue for a flush on demand.
    """

    __slots__ = ("_command", "_fds")

    def __init__(self) -> None:
        self._command: Command | None = None
        self._fds: list[int] = []

    def __len__(self) -> int:
        return len(self._fds)

    def add(self, fd: int, command: Command) -> Batch | None:
        """Queue `fd` for `command`; return a batch that is now due, or None."""
        due = None
        if self._fds and command != self._command:
            due = self.take()
        self._command = command
        self._fds.append(fd)
        if len(self._fds) == SCM_MAX_FD:
            # Only one batch can be due per call: a command change leaves one descriptor queued.
            due = self.take()
        return due

    def take(self) -> Batch | None:
        """Empty the queue; return what it held as a batch, or None if it was empty."""
        if not self._fds or self._command is None:
            return None
        batch = Batch(self._command, tuple(self._fds))
        self._fds = []
        return batch
