# SPDX-License-Identifier: GPL-2.0-or-later
"""The binary encoding of a list of connection states, strict on input.

    stream  := header record*
    header  := magic "PRTC" | version u16 (2) | reserved u16 (0) | count u32
    record  := length u32 | fixed part | congestion name | sent | unsent | received | crc u32

All integers are big-endian. `length` counts the bytes of the record after
itself, the CRC included. The fixed part holds the address family (4 or 6),
the TCP state, a flags word saying which optional parts are present, both
endpoints, the sequence numbers, MSS, window scales, timestamp, repair
window, socket options, and the lengths of the name and the three queues
that follow. `crc` is the CRC-32 (zlib.crc32) of the record before it, its
length word included.

`decode` verifies each record's CRC before it reads any value from it, so
a bit flipped on the way is refused, never turned into a different
connection: CRC-32 detects every single-bit error and every burst of up to
32 bits, and misses other random damage with a probability of 2^-32. It is
a check against accidents, not an authenticator: whoever can change the
bytes can recompute it (move the stream over an authenticated channel if
the transport is not trusted). `decode` also accepts only what `encode`
could have produced: a wrong magic or version, a record cut short, a
length that disagrees with its parts, trailing bytes, unknown flags, or any
value `state.check` refuses, raise RecordError naming the record and the
fault. Nothing is returned then, so no socket is ever made from part of a
bad stream.

Version 1 (no CRC, no TCP_NOTSENT_LOWAT) is refused with its own message:
a stream lives only for one move, made and read by the same release on
both ends, and reading unchecked bytes into live connections is what the
check exists to prevent.
"""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Sequence

from .state import ConnectionState, RecordError, RepairWindow, SocketOptions, TcpState, assemble, check, check_new

__all__ = ["MAGIC", "VERSION", "decode", "encode"]

MAGIC = b"PRTC"
VERSION = 2

_HEADER = struct.Struct("!4sHHI")
HEADER_SIZE = _HEADER.size
_CRC = struct.Struct("!I")
#: Bytes after a record's queues: its CRC-32.
TRAILER_SIZE = _CRC.size

F_SACK = 1 << 0
F_TIMESTAMPS = 1 << 1
F_RCV_SHUTDOWN = 1 << 2
F_NODELAY = 1 << 3
F_KEEPALIVE = 1 << 4
F_SNDBUF = 1 << 5
F_RCVBUF = 1 << 6
F_WSCALE = 1 << 7
_KNOWN_FLAGS = F_SACK | F_TIMESTAMPS | F_RCV_SHUTDOWN | F_NODELAY | F_KEEPALIVE | F_SNDBUF | F_RCVBUF | F_WSCALE

# length, family, state, flags, local addr+port, remote addr+port, snd_seq, rcv_seq, mss,
# snd/rcv wscale, timestamp, window (5), keepidle, keepintvl, keepcnt, user_timeout, tos, mark,
# sndbuf, rcvbuf, notsent_lowat, name length, sent/unsent/received lengths
_FIXED = "IBBH{0}sH{0}sHIIHBBI5IHHBIBIIIIBIII"
_FIXED_BY_FAMILY = {4: struct.Struct("!" + _FIXED.format(4)), 6: struct.Struct("!" + _FIXED.format(16))}
_FAMILY_AT = 4  # offset of the family byte in a record
_STATES = {s.value: s for s in TcpState}


def _flags(s: ConnectionState) -> int:
    o = s.options
    return (
        (F_SACK if s.sack else 0)
        | (F_WSCALE if s.window_scaling else 0)
        | (F_TIMESTAMPS if s.timestamp is not None else 0)
        | (F_RCV_SHUTDOWN if s.rcv_shutdown else 0)
        | (F_NODELAY if o.nodelay else 0)
        | (F_KEEPALIVE if o.keepalive else 0)
        | (F_SNDBUF if o.sndbuf is not None else 0)
        | (F_RCVBUF if o.rcvbuf is not None else 0)
    )


def encode(states: Sequence[ConnectionState]) -> bytes:
    """The stream for `states`; RecordError if one of them is not a valid connection."""
    parts: list[bytes | memoryview] = [header(len(states))]
    crc32 = zlib.crc32
    for index, s in enumerate(states):
        head = record_head(s, index)
        crc = crc32(s.received, crc32(s.unsent, crc32(s.sent, crc32(head))))
        parts += (head, s.sent, s.unsent, s.received, _CRC.pack(crc))
    return b"".join(parts)


def seal(stream: memoryview, start: int, end: int) -> None:
    """Write the CRC of the record laid out in `stream[start:end]` into the 4 bytes after it."""
    _CRC.pack_into(stream, end, zlib.crc32(stream[start:end]))


def header(count: int) -> bytes:
    """The stream header for `count` records."""
    return _HEADER.pack(MAGIC, VERSION, 0, count)


def head_size(local: str, congestion: str) -> int:
    """How many bytes of a record come before its queues (length word included)."""
    return _FIXED_BY_FAMILY[6 if ":" in local else 4].size + len(congestion)


def record_head(s: ConnectionState, index: int = 0) -> bytes:
    """A record up to its queues: length word, fixed part, congestion name. RecordError if `s` is invalid.

    The queues follow it in the stream: sent, unsent, received.
    """
    try:
        check(s)
    except RecordError as e:
        raise RecordError(f"record {index} ({s.describe()}): {e}") from None
    version = 6 if ":" in s.local[0] else 4
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    fixed = _FIXED_BY_FAMILY[version]
    name = s.options.congestion.encode("ascii")
    w, o = s.window, s.options
    length = fixed.size - 4 + len(name) + len(s.sent) + len(s.unsent) + len(s.received) + TRAILER_SIZE
    # fmt: off
    return fixed.pack(
        length, version, s.state, _flags(s),
        socket.inet_pton(family, s.local[0]), s.local[1],
        socket.inet_pton(family, s.remote[0]), s.remote[1],
        s.snd_seq, s.rcv_seq, s.mss, s.snd_wscale, s.rcv_wscale, s.timestamp or 0,
        w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup,
        o.keepidle, o.keepintvl, o.keepcnt, o.user_timeout, o.tos, o.mark,
        o.sndbuf or 0, o.rcvbuf or 0, o.notsent_lowat,
        len(name), len(s.sent), len(s.unsent), len(s.received),
    ) + name
    # fmt: on


def decode(data: bytes | bytearray | memoryview, *, copy: bool = True) -> list[ConnectionState]:
    """The states in `data`, all of them, or RecordError for the first fault found.

    With `copy=False` the queues are read-only views into `data` instead of
    copies: no second copy of every queued byte. `data` must then not change
    while the states are in use.
    """
    view = memoryview(data).cast("B").toreadonly()
    if len(view) < _HEADER.size:
        raise RecordError(f"truncated: {len(view)} bytes, a stream starts with a {_HEADER.size}-byte header")
    magic, version, reserved, count = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise RecordError(f"not a connection state stream (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version == 1:
        raise RecordError(
            f"version 1 stream (no integrity check) is not read: this reads version {VERSION}; "
            "checkpoint again with the same release on both ends"
        )
    if version != VERSION:
        raise RecordError(f"unsupported version {version} (this reads version {VERSION})")
    if reserved:
        raise RecordError(f"reserved header field is {reserved:#x}, expected 0")
    states: list[ConnectionState] = []
    offset = _HEADER.size
    for index in range(count):
        if offset == len(view):
            raise RecordError(f"truncated: the header announces {count} records, the stream holds {index}")
        try:
            state, offset = _decode_record(view, offset, copy)
        except RecordError as e:
            raise RecordError(f"record {index}: {e}") from None
        states.append(state)
    if offset != len(view):
        raise RecordError(f"{len(view) - offset} bytes after the last of {count} records")
    return states


def _decode_record(view: memoryview, offset: int, copy: bool) -> tuple[ConnectionState, int]:
    left = len(view) - offset
    if left < _FAMILY_AT + 1:
        raise RecordError(f"truncated: {left} bytes left, a record needs more")
    (length,) = _CRC.unpack_from(view, offset)
    if length + 4 > left:
        raise RecordError(f"truncated: the record says {length + 4} bytes, {left} are left")
    if length < _FAMILY_AT + TRAILER_SIZE:
        raise RecordError(f"inconsistent: the record says {length} bytes, too few for any record")
    # Before any value is read: a flipped bit must not decide what the record says it is.
    crc_at = offset + length
    (crc,) = _CRC.unpack_from(view, crc_at)
    actual = zlib.crc32(view[offset:crc_at])
    if actual != crc:
        raise RecordError(f"integrity check failed: the record's CRC-32 is {actual:#010x}, it carries {crc:#010x}")
    version = view[offset + _FAMILY_AT]
    fixed = _FIXED_BY_FAMILY.get(version)
    if fixed is None:
        raise RecordError(f"address family {version} is neither 4 nor 6")
    if left < fixed.size:
        raise RecordError(f"truncated: {left} bytes left, the fixed part of an IPv{version} record is {fixed.size}")
    (
        length, _, state, flags, laddr, lport, raddr, rport,
        snd_seq, rcv_seq, mss, snd_wscale, rcv_wscale, timestamp,
        snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup,
        keepidle, keepintvl, keepcnt, user_timeout, tos, mark, sndbuf, rcvbuf, notsent_lowat,
        name_len, sent_len, unsent_len, received_len,
    ) = fixed.unpack_from(view, offset)  # fmt: skip
    parts = fixed.size - 4 + name_len + sent_len + unsent_len + received_len + TRAILER_SIZE
    if length != parts:
        raise RecordError(f"inconsistent: the record says {length} bytes, its parts add up to {parts}")
    if flags & ~_KNOWN_FLAGS:
        raise RecordError(f"unknown flags {flags & ~_KNOWN_FLAGS:#x}")
    tcp_state = _STATES.get(state)
    if tcp_state is None:
        raise RecordError(f"unknown TCP state {state}")
    if not flags & F_TIMESTAMPS and timestamp:
        raise RecordError("a timestamp value without the timestamps flag")
    if (sndbuf and not flags & F_SNDBUF) or (rcvbuf and not flags & F_RCVBUF):
        raise RecordError("a buffer size without its flag")
    pos = offset + fixed.size
    try:
        name = str(view[pos : pos + name_len], "ascii")
    except UnicodeDecodeError:
        raise RecordError("congestion control name is not ASCII") from None
    pos += name_len
    sent = view[pos : pos + sent_len]
    pos += sent_len
    unsent = view[pos : pos + unsent_len]
    pos += unsent_len
    received = view[pos : pos + received_len]
    pos += received_len
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    inet_ntop = socket.inet_ntop
    options = assemble(
        SocketOptions,
        {
            "nodelay": bool(flags & F_NODELAY),
            "keepalive": bool(flags & F_KEEPALIVE),
            "keepidle": keepidle,
            "keepintvl": keepintvl,
            "keepcnt": keepcnt,
            "user_timeout": user_timeout,
            "congestion": name,
            "sndbuf": sndbuf if flags & F_SNDBUF else None,
            "rcvbuf": rcvbuf if flags & F_RCVBUF else None,
            "tos": tos,
            "mark": mark,
            "notsent_lowat": notsent_lowat,
        },
    )
    window = assemble(
        RepairWindow,
        {"snd_wl1": snd_wl1, "snd_wnd": snd_wnd, "max_window": max_window, "rcv_wnd": rcv_wnd, "rcv_wup": rcv_wup},
    )
    result = assemble(
        ConnectionState,
        {
            "local": (inet_ntop(family, laddr), lport),
            "remote": (inet_ntop(family, raddr), rport),
            "state": tcp_state,
            "snd_seq": snd_seq,
            "rcv_seq": rcv_seq,
            "mss": mss,
            "window_scaling": bool(flags & F_WSCALE),
            "snd_wscale": snd_wscale,
            "rcv_wscale": rcv_wscale,
            "sack": bool(flags & F_SACK),
            "timestamp": timestamp if flags & F_TIMESTAMPS else None,
            "window": window,
            "sent": bytes(sent) if copy else sent,
            "unsent": bytes(unsent) if copy else unsent,
            "received": bytes(received) if copy else received,
            "rcv_shutdown": bool(flags & F_RCV_SHUTDOWN),
            "options": options,
        },
    )
    check_new(result)
    return result, pos + TRAILER_SIZE
