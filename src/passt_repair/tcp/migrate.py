# SPDX-License-Identifier: GPL-2.0-or-later
"""Checkpoint and restore many connections, switching repair mode in batches.

On the source:

 1. Stop receiving for the service address (remove it, or drop its traffic):
    a socket in repair mode still acknowledges what arrives, and what
    arrives after the dump would be lost (docs/migration.md).
 2. `checkpoint(sockets, switcher)`: repair mode on (in batches of 253
    through the helper), then each socket dumped. The sockets stay frozen
    in repair mode; close them once the address is gone (closing a socket
    in repair mode sends nothing). `thaw` instead gives them back to the
    source if the move is called off.
 3. `wire.encode(checkpoint.states)` and send the bytes to the target.

On the target:

 4. With the target cut off from the network and the address already on
    it: `restore(wire.decode(data), switcher)` makes each socket, switches
    them to repair mode in batches, and fills them (`restore.fill`).
 5. Reattach the target and announce the address (gratuitous ARP, an
    unsolicited neighbour advertisement).
 6. `resume(restored, switcher)`: repair mode off in batches (the kernel
    sends each peer a window probe), then the unsent bytes and the FINs.

A switcher is anything with `switch(sockets, command)`: a connected
`RepairServer` (no privilege needed here; the helper has it), or
`DirectSwitcher` when this process holds CAP_NET_ADMIN itself. One
connection that fails is reported in `failures` and the others go on; a
connection that failed on the target is closed there, and the peer sees a
reset, never a half-made socket.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import socket
import struct
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol import SOL_TCP, TCP_REPAIR, Command
from ..server import RepairError, SocketLike
from . import _linux as k
from . import restore as steps
from . import wire
from .dump import INFO_SIZE, DumpError, Probe, probe, view
from .state import MOVABLE_STATES, ConnectionState, RecordError, TcpState, check, check_new

__all__ = [
    "Checkpoint",
    "DirectSwitcher",
    "Failure",
    "Restored",
    "StepError",
    "Switcher",
    "checkpoint",
    "restore",
    "resume",
    "stream_buffer",
    "thaw",
]


class StepError(RuntimeError):
    """A step asked of connections that have already taken it (resume or thaw twice): nothing was changed."""


class Switcher(Protocol):
    """Sets TCP_REPAIR on sockets: RepairServer (through the helper) or DirectSwitcher."""

    def switch(self, sockets: Iterable[SocketLike], command: Command) -> None: ...


class DirectSwitcher:
    """Switch repair mode in this process, which must hold CAP_NET_ADMIN.

    Fails the way RepairServer does: RepairError at the first socket that
    cannot be switched, with the sockets before it switched (`confirmed`).
    """

    def switch(self, sockets: Iterable[SocketLike], command: Command) -> None:
        value = int(Command(command))
        for done, sock in enumerate(sockets):
            # A socket object is used as it is: a view of a bare descriptor costs a getsockname().
            view = (
                sock
                if isinstance(sock, socket.socket)
                else socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, _fd(sock))
            )
            try:
                view.setsockopt(SOL_TCP, TCP_REPAIR, value)
            except OSError as e:
                name = errno.errorcode.get(e.errno or 0, f"errno {e.errno}")
                raise RepairError(
                    f"setsockopt(TCP_REPAIR, {Command(command).name}) on descriptor {view.fileno()}: "
                    f"{name} ({os.strerror(e.errno or 0)})",
                    (),
                    done,
                ) from None
            finally:
                if view is not sock:
                    view.detach()


@dataclass(frozen=True)
class Failure:
    """One connection that did not move: its position in the caller's list, what it was, and why."""

    index: int
    connection: str
    reason: str

    def __str__(self) -> str:
        return f"connection {self.index} ({self.connection}): {self.reason}"


@dataclass
class Checkpoint:
    """What `checkpoint` read: `states[i]` is the socket at position `indices[i]` of the list given.

    `data` is `encode(states)`, made while dumping: the queues were read
    straight into their place in it, and `states` hold read-only views of it.
    """

    states: list[ConnectionState] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    data: bytes | memoryview = b""


@dataclass
class Restored:
    """New sockets from `restore`: `sockets[i]` continues `states[i]`, or is None if it failed.

    `resumed` is set by `resume`, which refuses to run twice.
    """

    states: list[ConnectionState]
    sockets: list[socket.socket | None]
    failures: list[Failure] = field(default_factory=list)
    resumed: bool = False

    def live(self) -> list[tuple[ConnectionState, socket.socket]]:
        """The states and sockets that have not failed."""
        return [(st, s) for st, s in zip(self.states, self.sockets, strict=True) if s is not None]


def _fd(sock: SocketLike) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def _in_repair(fd: int) -> bool:
    view = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        return bool(view.getsockopt(SOL_TCP, TCP_REPAIR))
    except OSError:
        return False
    finally:
        view.detach()


def _switch(switcher: Switcher, sockets: Sequence[SocketLike], command: Command) -> str | None:
    """Switch all `sockets`; on failure return the reason (each socket's state then tells what happened)."""
    try:
        switcher.switch(sockets, command)
    except RepairError as e:
        return str(e)
    return None


def _polled(fds: Sequence[int]) -> dict[int, int]:
    """POLLRDHUP (reading has ended), POLLHUP and POLLERR of each descriptor that has any, in one poll()."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, k.POLLRDHUP)
    return dict(poller.poll(0))


#: What poll() reports in each state whose TCP_INFO, read before the switch, only a segment could make
#: stale; a segment that did (a FIN, a reset) shows in poll(). The other states are read again.
_QUIET: dict[int, int] = {TcpState.ESTABLISHED: 0, TcpState.CLOSE_WAIT: k.POLLRDHUP, TcpState.FIN_WAIT2: 0}


def checkpoint(
    sockets: Sequence[SocketLike], switcher: Switcher, *, buffer: mmap.mmap | bytearray | None = None
) -> Checkpoint:
    """Freeze `sockets` in repair mode and read each connection's state.

    The sockets stay in repair mode: close them when the move is done (that
    sends nothing), or `thaw` them to carry on here. A socket that could not
    be switched or read is in `failures` (still in repair mode if the switch
    reached it); the others are in `states`.

    The encoded stream (`data`) is laid out in `buffer` if it is big enough,
    else in a new mapping (`stream_buffer`). A caller that keeps a buffer
    ready (made by `stream_buffer` beforehand, or used before) spares the
    dump the page faults of fresh memory. The states and `data` are views
    of it: do not reuse it until they are done with, `resume` included.
    """
    fds = [_fd(s) for s in sockets]
    result = Checkpoint()
    made: list[socket.socket] = []  # views of the descriptors, detached before returning
    try:
        # A socket the helper would refuse (not TCP, listening) fails its whole batch: leave such ones out.
        on_fds: dict[int, socket.socket] = {}
        infos: dict[int, bytes] = {}  # TCP_INFO as read before the switch
        for index, fd in enumerate(fds):
            try:
                on_fd = view(fd)
            except OSError as e:
                name = errno.errorcode.get(e.errno or 0, f"errno {e.errno}")
                result.failures.append(Failure(index, f"descriptor {fd}", f"not a socket ({name})"))
                continue
            except ValueError as e:  # a closed socket's descriptor, -1
                result.failures.append(Failure(index, f"descriptor {fd}", f"not a socket ({e})"))
                continue
            made.append(on_fd)
            info = _tcp_info(on_fd)
            if isinstance(info, str):
                result.failures.append(Failure(index, _describe(on_fd), info))
            else:
                on_fds[index] = on_fd
                infos[index] = info
        reason = _switch(switcher, list(on_fds.values()), Command.ON)
        polled = _polled([fds[i] for i in on_fds])
        probes: list[tuple[int, Probe]] = []
        for index, on_fd in on_fds.items():
            if reason is not None and not _in_repair(fds[index]):
                result.failures.append(Failure(index, _describe(on_fd), f"repair mode not switched on: {reason}"))
                continue
            events = polled.get(fds[index], 0)
            before: bytes | None = infos[index]
            if _QUIET.get(infos[index][0]) != events:
                before = None
            try:
                probes.append((index, probe(on_fd, rcv_shutdown=bool(events & k.POLLRDHUP), info=before)))
            except DumpError as e:
                result.failures.append(Failure(index, _describe(on_fd), str(e)))
        _read_into_stream(probes, result, buffer)
    finally:
        for on_fd in made:
            on_fd.detach()
    result.failures.sort(key=lambda f: f.index)
    return result


def _read_into_stream(
    probes: list[tuple[int, Probe]], result: Checkpoint, buffer: mmap.mmap | bytearray | None
) -> None:
    """Peek every queue straight into its place in one buffer laid out as the encoded stream."""
    header_size = wire.HEADER_SIZE
    heads = [wire.head_size(p.local[0], p.user.congestion) for _, p in probes]
    trailer = wire.TRAILER_SIZE
    total = header_size + sum(h + p.send_len + p.recv_len + trailer for h, (_, p) in zip(heads, probes, strict=True))
    if buffer is not None and len(buffer) >= total:
        stream = memoryview(buffer)[:total]
    else:
        stream = memoryview(stream_buffer(total, populate=False))
    offset = header_size
    whole = True
    states, indices = result.states, result.indices
    for head, (index, found) in zip(heads, probes, strict=True):
        start = offset + head
        sent_end = start + found.send_len
        end = sent_end + found.recv_len
        try:
            state = found.read_queues(stream[start:sent_end], stream[sent_end:end])
            # Checked here, where it fails alone: on the target, decode would refuse the whole stream.
            check_new(state)
            stream[offset:start] = wire.record_head(state, len(states))
            wire.seal(stream, offset, end)
        except (DumpError, RecordError) as e:
            result.failures.append(Failure(index, _describe(found.view), str(e)))
            whole = False
        else:
            states.append(state)
            indices.append(index)
        offset = end + trailer
    if whole:
        stream[:header_size] = wire.header(len(states))
        result.data = stream.toreadonly()
    else:  # a record is missing from the buffer: make the stream again from what was read
        result.data = wire.encode(states)


def stream_buffer(size: int, *, populate: bool = True) -> mmap.mmap:
    """Private anonymous memory for `size` bytes of stream, for `checkpoint(..., buffer=...)`.

    Its own mapping: freed whole when the last view of it goes. With
    `populate` every page is faulted in now (MAP_POPULATE), which costs
    less than faulting them one by one during the dump: a server that
    moves connections can keep such a buffer ready.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (mmap.MAP_POPULATE if populate else 0)
    return mmap.mmap(-1, max(size, 1), flags=flags)


def _tcp_info(on_fd: socket.socket) -> bytes | str:
    """TCP_INFO's first bytes (for `probe`), read without privilege; or why the socket cannot move."""
    try:
        info: bytes = on_fd.getsockopt(SOL_TCP, k.TCP_INFO, INFO_SIZE)
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, f"errno {e.errno}")
        return f"not a TCP socket (getsockopt(TCP_INFO): {name})"
    state = info[0]
    if state in MOVABLE_STATES:
        return info
    try:
        label = TcpState(state).name
    except ValueError:
        label = str(state)
    return f"cannot move a connection in state {label}"


def _describe(on_fd: socket.socket) -> str:
    """'local -> remote' for an IP socket; 'descriptor N' for any other (an AF_UNIX address is a string)."""
    try:
        local, remote = on_fd.getsockname(), on_fd.getpeername()
    except OSError:
        return f"descriptor {on_fd.fileno()}"
    if not (isinstance(local, tuple) and isinstance(remote, tuple)):
        return f"descriptor {on_fd.fileno()}"
    return f"{local[0]}:{local[1]} -> {remote[0]}:{remote[1]}"


def thaw(sockets: Sequence[SocketLike], switcher: Switcher) -> None:
    """Call a move off: switch repair mode off on the source's frozen sockets; they carry on here.

    StepError, and nothing switched, if one of them is not in repair mode
    (thawed already, or never frozen): switching a live socket "off" again
    would send the peer another window probe for nothing.
    """
    fds = [_fd(s) for s in sockets]
    live = [index for index, fd in enumerate(fds) if not _in_repair(fd)]
    if live:
        raise StepError(f"thaw(): {_listed(live, lambda i: _describe_fd(fds[i]))} not frozen; nothing was switched")
    switcher.switch(fds, Command.OFF)


def _describe_fd(fd: int) -> str:
    try:
        on_fd = view(fd)
    except (OSError, ValueError):
        return f"descriptor {fd}"
    try:
        return _describe(on_fd)
    finally:
        on_fd.detach()


def _listed(indices: Sequence[int], describe: Callable[[int], str]) -> str:
    """'connection 3 (a -> b) is' or 'connections 3 (a -> b), 5 (...) and 2 more are', for StepError."""
    named = ", ".join(f"{i} ({describe(i)})" for i in indices[:3])
    more = f" and {len(indices) - 3} more" if len(indices) > 3 else ""
    return f"connection {named} is" if len(indices) == 1 else f"connections {named}{more} are"


def restore(states: Sequence[ConnectionState], switcher: Switcher) -> Restored:
    """Make a socket for every state, frozen in repair mode until `resume`.

    Every state is checked before any socket is made: a broken record
    raises RecordError and nothing is created. The local addresses must
    exist here (connect() in repair mode needs them), and the peers should
    not reach this host yet (docs/migration.md). A connection that fails is closed
    (in repair mode, silently) and reported; the others go on. A state whose
    socket from an earlier restore is still open raises StepError, before
    any socket is made.
    """
    for index, state in enumerate(states):
        try:
            check(state)
        except RecordError as e:
            raise RecordError(f"record {index} ({state.describe()}): {e}") from None
    again = [index for index, state in enumerate(states) if _restored_into(state) is not None]
    if again:
        listed = _listed(again, lambda i: states[i].describe()).replace("connection", "record", 1)
        raise StepError(f"restore(): {listed} already restored into a socket still open; nothing was made")
    result = Restored(list(states), [None] * len(states))
    made: list[int] = []
    for index, state in enumerate(states):
        try:
            sock = result.sockets[index] = steps.create(state)
            made.append(index)
        except steps.RestoreError as e:
            _fail(result, index, str(e), reset=False)
        else:
            # Not a field: equality, replace() and the wire ignore it; a weak reference keeps no socket alive.
            _setattr(state, _RESTORED_INTO, weakref.ref(sock))
    reason = _switch(switcher, [_sock(result, i) for i in made], Command.ON)
    defaults: dict[socket.AddressFamily, steps.Defaults] = {}
    for index in made:
        sock, state = _sock(result, index), states[index]
        if reason is not None and not _in_repair(sock.fileno()):
            _fail(result, index, f"repair mode not switched on: {reason}", reset=False)
            continue
        family_defaults = defaults.get(state.family)
        if family_defaults is None:
            family_defaults = defaults[state.family] = steps.Defaults(state.family)
        try:
            steps.fill(sock, state, family_defaults)
        except steps.RestoreError as e:
            _fail(result, index, str(e), reset=False)
    return result


def resume(restored: Restored, switcher: Switcher) -> None:
    """Bring the restored sockets to life: repair mode off, then unsent bytes and FINs.

    Call it once the target is reachable again. A connection that fails now
    is reset (RST to the peer) and closed, and added to `restored.failures`.
    A second call raises StepError and changes nothing: the unsent bytes
    were queued once already, and queuing them again would send them twice.
    """
    if restored.resumed:
        live = [i for i, s in enumerate(restored.sockets) if s is not None]
        listed = _listed(live, lambda i: restored.states[i].describe()) if live else "no connection is"
        raise StepError(f"resume(): {listed} already resumed; nothing was changed")
    live = [i for i, s in enumerate(restored.sockets) if s is not None]
    reason = _switch(switcher, [_sock(restored, i) for i in live], Command.OFF)
    restored.resumed = True
    for index in live:
        sock = _sock(restored, index)
        if reason is not None and _in_repair(sock.fileno()):
            _fail(restored, index, f"repair mode not switched off: {reason}", reset=False)
            continue
        try:
            steps.finish(sock, restored.states[index])
        except steps.RestoreError as e:
            _fail(restored, index, str(e), reset=True)


_RESTORED_INTO = "_restored_into"
_setattr = object.__setattr__


def _restored_into(state: ConnectionState) -> socket.socket | None:
    """The socket `restore` made for `state`, if it is still open."""
    ref: weakref.ref[socket.socket] | None = state.__dict__.get(_RESTORED_INTO)
    sock = ref() if ref is not None else None
    return sock if sock is not None and sock.fileno() != -1 else None


def _sock(restored: Restored, index: int) -> socket.socket:
    sock = restored.sockets[index]
    assert sock is not None
    return sock


def _fail(restored: Restored, index: int, reason: str, *, reset: bool) -> None:
    """Record the failure and close the socket: with an RST if it is live, silently if in repair mode."""
    sock = restored.sockets[index]
    if sock is not None:
        if reset:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        restored.sockets[index] = None
    restored.failures.append(Failure(index, restored.states[index].describe(), reason))
