# SPDX-License-Identifier: GPL-2.0-or-later
"""What travels for one TCP connection: plain data, no sockets.

A ConnectionState is read from a socket in repair mode (`dump`), turned into
bytes and back (`wire`), and made into a new socket (`restore`). Its
sequence numbers point at the first byte of each queue, and no count in it
includes a FIN: the state says which FINs were sent and received.
"""

from __future__ import annotations

import enum
import re
import socket
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "MAX_QUEUE",
    "MOVABLE_STATES",
    "ConnectionState",
    "RecordError",
    "RepairWindow",
    "SocketOptions",
    "TcpState",
    "assemble",
    "check",
    "check_new",
]


class TcpState(enum.IntEnum):
    """The kernel's TCP states (include/net/tcp_states.h), as TCP_INFO reports them."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11

    @property
    def fin_sent(self) -> bool:
        """Whether this side has shut down sending (its FIN is queued, sent or acknowledged)."""
        return self in _FIN_SENT

    @property
    def fin_received(self) -> bool:
        """Whether the peer's FIN has arrived."""
        return self in _FIN_RECEIVED


_FIN_SENT = frozenset({TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.LAST_ACK, TcpState.CLOSING})
_FIN_RECEIVED = frozenset({TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING})

#: States a connection can move in: synchronised, and still held by the application.
MOVABLE_STATES = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.FIN_WAIT1,
        TcpState.FIN_WAIT2,
        TcpState.CLOSE_WAIT,
        TcpState.LAST_ACK,
        TcpState.CLOSING,
    }
)


@dataclass(frozen=True)
class RepairWindow:
    """TCP_REPAIR_WINDOW: what this side knows of both windows (struct tcp_repair_window).

    `rcv_wup` never counts the peer's FIN, so that it is not after the
    restored receive sequence; `rcv_wup + rcv_wnd`, the right edge advertised
    to the peer, is kept.
    """

    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int


@dataclass(frozen=True)
class SocketOptions:
    """The options an application sets and expects to find again after the move.

    `sndbuf`/`rcvbuf` are None unless the application set them (SO_BUF_LOCK);
    otherwise the kernel sizes the buffers itself on both sides. `tos` is
    IP_TOS for IPv4 and IPV6_TCLASS for IPv6. `notsent_lowat` is
    TCP_NOTSENT_LOWAT as an unsigned 32-bit value (0: the sysctl's).
    """

    nodelay: bool = False
    keepalive: bool = False
    keepidle: int = 7200
    keepintvl: int = 75
    keepcnt: int = 9
    user_timeout: int = 0
    congestion: str = ""
    sndbuf: int | None = None
    rcvbuf: int | None = None
    tos: int = 0
    mark: int = 0
    notsent_lowat: int = 0


@dataclass(frozen=True)
class ConnectionState:
    """One connection, frozen: enough to make a new socket that continues it.

        `local` and `remote` are (address, port) with the address as text.
        `snd_seq` is the sequence number of the first byte of `sent` (the oldest
        unacknowledged byte); `unsent` follows `sent` directly and has not been
        transmitted. `rcv_seq` is the sequence number of the first byte of
        `received` (the oldest unread byte). `mss` is the MSS clamp (the peer's
    announced MSS, or TCP_MAXSEG if set lower). Window scales are 0 when
    `window_scaling` is off. `timestamp` is the RFC 7323 timestamp value
        to go on from, never below a TSval the peer has seen (the dump adds
        the pacing lead), None when the connection does not use timestamps.
        The queues are bytes, or read-only views into a decoded stream
    (`decode(data, copy=False)`), which then stays alive with them.
    `rcv_shutdown`: reading has ended (the peer's FIN arrived, or the
        application shut down reading); the new socket then reads `received` and
        after it end of file.
    """

    local: tuple[str, int]
    remote: tuple[str, int]
    state: TcpState
    snd_seq: int
    rcv_seq: int
    mss: int
    window_scaling: bool
    snd_wscale: int
    rcv_wscale: int
    sack: bool
    timestamp: int | None
    window: RepairWindow
    sent: bytes | memoryview = b""
    unsent: bytes | memoryview = b""
    received: bytes | memoryview = b""
    rcv_shutdown: bool = False
    options: SocketOptions = field(default_factory=SocketOptions)
    #: Set by `check` once the record passed (not a field: `replace` and `==` ignore it).
    _checked = False

    @property
    def family(self) -> socket.AddressFamily:
        """AF_INET or AF_INET6, from the local address."""
        return socket.AF_INET6 if ":" in self.local[0] else socket.AF_INET

    @property
    def rcv_nxt(self) -> int:
        """The next sequence number expected from the peer (end of `received`, FIN not counted)."""
        return (self.rcv_seq + len(self.received)) & 0xFFFFFFFF

    def describe(self) -> str:
        """'local -> remote' for messages."""
        return f"{_endpoint(self.local)} -> {_endpoint(self.remote)}"


def _endpoint(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


_Record = TypeVar("_Record", "ConnectionState", "RepairWindow", "SocketOptions")


def assemble(cls: type[_Record], fields: dict[str, Any]) -> _Record:
    """`cls(**fields)` for `fields` holding every field, at a third of the cost of the frozen __init__.

    That __init__ makes one object.__setattr__ call per field; this gives
    the new record `fields` as its attributes at once. For the readers that
    make records per connection (`dump`, `wire.decode`); tests check that
    what they make equals what the constructor makes.
    """
    record = _new(cls)
    _setattr(record, "__dict__", fields)
    return record


_new = object.__new__
_setattr = object.__setattr__


class RecordError(ValueError):
    """A state record that cannot describe a real connection, or bytes that do not hold records."""


#: Largest queue a record may carry (bytes); a larger one is refused as oversized.
MAX_QUEUE = 64 << 20
#: Kernel limits (include/net/tcp.h, include/uapi/linux/tcp.h).
MAX_WSCALE = 14
MAX_KEEPIDLE = 32767
MAX_KEEPINTVL = 32767
MAX_KEEPCNT = 127
CONGESTION_NAME_MAX = 15


def _after(a: int, b: int) -> bool:
    """Sequence number a comes after b (modulo 2^32), as the kernel's after()."""
    return 0 < ((a - b) & 0xFFFFFFFF) < 0x80000000


_UNSPECIFIED = (bytes(4), bytes(16))


def _check_address(what: str, addr: tuple[str, int], family: socket.AddressFamily) -> None:
    host, port = addr
    try:
        packed = socket.inet_pton(family, host)
    except (OSError, TypeError, ValueError):
        other = socket.AF_INET if family == socket.AF_INET6 else socket.AF_INET6
        try:
            socket.inet_pton(other, host)
        except (OSError, TypeError, ValueError):
            raise RecordError(f"{what} address {host!r} is not an IP address") from None
        versions = ("IPv6", "IPv4") if family == socket.AF_INET else ("IPv4", "IPv6")
        raise RecordError(f"{what} address {host} is {versions[0]}, the other end {versions[1]}") from None
    multicast = packed[0] == 0xFF if family == socket.AF_INET6 else 224 <= packed[0] <= 239
    if multicast or packed in _UNSPECIFIED:
        raise RecordError(f"{what} address {host} cannot be one end of a TCP connection")
    if not 0 < port < 65536:
        raise RecordError(f"{what} port {port} is out of range (1-65535)")


def check(state: ConnectionState) -> None:
    """Raise RecordError unless `state` is a connection the kernel could hold.

    Checks what the kernel checks when it is restored (window scale, the
    repair window) before any socket is made, and what only a broken or
    hostile record gets wrong (a FIN_WAIT2 connection with unacknowledged
    data, a closed receive side that is not marked so).

    A record whose parts cannot change (tuples, bytes or views, the frozen
    window and options) is checked once: it is remembered as checked, so
    the checks that `decode` (or `checkpoint`), `encode` and `restore` each
    make cost nothing the second time. `dataclasses.replace` makes a new
    record, which is checked again.
    """
    if state._checked:
        return
    _check_state(state)
    if (
        type(state.local) is tuple
        and type(state.remote) is tuple
        and type(state.window) is RepairWindow
        and type(state.options) is SocketOptions
        and type(state.sent) in _FIXED_LENGTH
        and type(state.unsent) in _FIXED_LENGTH
        and type(state.received) in _FIXED_LENGTH
    ):
        _setattr(state, "_checked", True)


def check_new(state: ConnectionState) -> None:
    """`check` for a record its caller just made from parts that cannot change (as `wire.decode` does)."""
    _check_state(state)
    _setattr(state, "_checked", True)


#: Queue types whose length cannot change (a bytearray's could, after the check).
_FIXED_LENGTH = (bytes, memoryview)
_U32 = 0xFFFFFFFF


def _check_state(state: ConnectionState) -> None:
    tcp_state = state.state
    if not isinstance(tcp_state, TcpState) or tcp_state not in MOVABLE_STATES:
        name = tcp_state.name if isinstance(tcp_state, TcpState) else repr(tcp_state)
        raise RecordError(f"state {name} cannot be moved (movable: ESTABLISHED and the closing states)")
    family = socket.AF_INET6 if ":" in state.local[0] else socket.AF_INET
    _check_address("local", state.local, family)
    _check_address("remote", state.remote, family)
    if not 0 <= state.snd_seq <= _U32:
        raise RecordError(f"snd_seq {state.snd_seq} is not a 32-bit sequence number")
    if not 0 <= state.rcv_seq <= _U32:
        raise RecordError(f"rcv_seq {state.rcv_seq} is not a 32-bit sequence number")
    if not 1 <= state.mss <= 0xFFFF:
        raise RecordError(f"MSS {state.mss} is out of range (1-65535)")
    if not (0 <= state.snd_wscale <= MAX_WSCALE and 0 <= state.rcv_wscale <= MAX_WSCALE):
        raise RecordError(f"window scale {state.snd_wscale}/{state.rcv_wscale} is out of range (0-{MAX_WSCALE})")
    if not state.window_scaling and (state.snd_wscale or state.rcv_wscale):
        raise RecordError("window scales without window scaling")
    if state.timestamp is not None and not 0 <= state.timestamp <= _U32:
        raise RecordError(f"timestamp {state.timestamp} is not a 32-bit value")
    sent, unsent, received = len(state.sent), len(state.unsent), len(state.received)
    if max(sent, unsent, received) > MAX_QUEUE:
        name, size = next(q for q in (("sent", sent), ("unsent", unsent), ("received", received)) if q[1] > MAX_QUEUE)
        raise RecordError(f"{name} queue of {size} bytes is oversized (limit {MAX_QUEUE})")
    if tcp_state is TcpState.FIN_WAIT2 and (sent or unsent):
        raise RecordError("FIN_WAIT2 means everything sent was acknowledged, yet the send queue is not empty")
    if tcp_state.fin_received and not state.rcv_shutdown:
        raise RecordError(f"{tcp_state.name} means the peer's FIN arrived, yet reading is not shut down")
    w = state.window
    values = (w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup)
    if min(values) < 0 or max(values) > _U32:
        for name, value in zip(("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"), values, strict=True):
            if not 0 <= value <= _U32:
                raise RecordError(f"window {name} {value} is not a 32-bit value")
    if w.max_window < w.snd_wnd:
        raise RecordError(f"window: max_window {w.max_window} is below snd_wnd {w.snd_wnd}")
    rcv_nxt = (state.rcv_seq + received) & _U32
    if _after(w.rcv_wup, rcv_nxt):
        raise RecordError(f"window: rcv_wup {w.rcv_wup} is after the next expected sequence {rcv_nxt}")
    if _after(w.snd_wl1, (rcv_nxt + w.rcv_wnd) & _U32):
        raise RecordError(f"window: snd_wl1 {w.snd_wl1} is beyond the receive window")
    _check_options(state.options)


#: A congestion control name as the kernel spells one (TCP_CA_NAME_MAX 16, NUL included).
_CONGESTION_NAME = re.compile(rf"[A-Za-z0-9_-]{{0,{CONGESTION_NAME_MAX}}}")


def _check_options(o: SocketOptions) -> None:
    if not 1 <= o.keepidle <= MAX_KEEPIDLE:
        raise RecordError(f"TCP_KEEPIDLE {o.keepidle} is out of range (1-{MAX_KEEPIDLE})")
    if not 1 <= o.keepintvl <= MAX_KEEPINTVL:
        raise RecordError(f"TCP_KEEPINTVL {o.keepintvl} is out of range (1-{MAX_KEEPINTVL})")
    if not 1 <= o.keepcnt <= MAX_KEEPCNT:
        raise RecordError(f"TCP_KEEPCNT {o.keepcnt} is out of range (1-{MAX_KEEPCNT})")
    if not 0 <= o.user_timeout <= 0x7FFFFFFF:
        raise RecordError(f"TCP_USER_TIMEOUT {o.user_timeout} is out of range")
    if not isinstance(o.congestion, str) or not _CONGESTION_NAME.fullmatch(o.congestion):
        raise RecordError(f"TCP_CONGESTION {o.congestion!r} is not a congestion control name")
    if o.sndbuf is not None and not 1 <= o.sndbuf <= 0x7FFFFFFF:
        raise RecordError(f"SO_SNDBUF {o.sndbuf} is out of range")
    if o.rcvbuf is not None and not 1 <= o.rcvbuf <= 0x7FFFFFFF:
        raise RecordError(f"SO_RCVBUF {o.rcvbuf} is out of range")
    if not 0 <= o.tos <= 0xFF:
        raise RecordError(f"TOS/traffic class {o.tos} is out of range (0-255)")
    if not 0 <= o.mark <= _U32:
        raise RecordError(f"SO_MARK {o.mark} is not a 32-bit value")
    if not 0 <= o.notsent_lowat <= _U32:
        raise RecordError(f"TCP_NOTSENT_LOWAT {o.notsent_lowat} is not a 32-bit value")
