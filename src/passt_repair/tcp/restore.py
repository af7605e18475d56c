# SPDX-License-Identifier: GPL-2.0-or-later
"""Make a new socket that continues a connection, from its state record.

The steps (docs/migration.md); repair mode is switched by the caller between them:

  1. socket(), SO_REUSEADDR.                                   `create`
     -- the caller switches repair mode on --
  2. bind() to the original local address.                     `fill`
  3. TCP_TIMESTAMP, if timestamps are on.
  4. Select the send queue, set its TCP_QUEUE_SEQ.
  5. Select the receive queue, set its TCP_QUEUE_SEQ.
  6. connect() to the peer: in repair mode, no handshake. TCP_MAXSEG is set
     for the connect to the segment size the source used and cleared after
     it: connect() is where the kernel sizes segments, and nothing does it
     again after the repair options.
  7. Write the received, unread bytes into the receive queue.
  8. Select the send queue, write the sent, unacknowledged bytes (they count
     as sent; the kernel retransmits them if the peer never got them).
  9. TCP_REPAIR_OPTIONS: MSS, window scale, SACK, timestamps.
 10. FIN_WAIT2: shutdown(SHUT_WR), so the FIN the peer already acknowledged
     is queued as sent and never transmitted.
 11. TCP_REPAIR_WINDOW.
 12. Reading had ended: shutdown(SHUT_RD), so the application reads the
     queued bytes and then end of file.
 13. The user's socket options that differ from a fresh socket's.
     -- the caller switches repair mode off: the kernel sends a window probe --
 14. Send the unsent bytes, normally.                           `finish`
 15. FIN_WAIT1, LAST_ACK, CLOSING: shutdown(SHUT_WR); the FIN follows them.

Sequence numbers and the timestamp are passed packed as unsigned 32-bit
values: above 2^31 they do not fit the int that setsockopt() packs.

If a queue does not fit the new socket's buffer, the buffer is raised for
the write (SO_SNDBUF/SO_RCVBUF, up to net.core.wmem_max/rmem_max) and the
buffer lock is put back afterwards, so the kernel keeps sizing buffers the
application never set.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from . import _linux as k
from .state import ConnectionState, SocketOptions, TcpState

__all__ = ["Defaults", "RestoreError", "create", "fill", "finish"]

_U32 = struct.Struct("I")
_WINDOW = struct.Struct("5I")
_OPTION = struct.Struct("II")
_TCP_MIN_MSS = 88
_TCP_MSS_DEFAULT = 536
_MAX_USER_MSS = 32767  # MAX_TCP_WINDOW: TCP_MAXSEG refuses more
_TCPOLEN_TSTAMP_ALIGNED = 12


class RestoreError(Exception):
    """A step of the restore failed; the message names it and the errno."""


def _oserror(step: str, e: OSError) -> RestoreError:
    name = errno.errorcode.get(e.errno or 0, f"errno {e.errno}")
    return RestoreError(f"{step}: {name} ({os.strerror(e.errno or 0)})")


class Defaults:
    """The option values of a fresh socket of one family, read once and compared against."""

    __slots__ = ("family", "options")

    def __init__(self, family: socket.AddressFamily) -> None:
        self.family = family
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            get = probe.getsockopt
            tos = get(socket.IPPROTO_IPV6, k.IPV6_TCLASS) if family == socket.AF_INET6 else get(0, k.IP_TOS)
            self.options = SocketOptions(
                nodelay=bool(get(k.SOL_TCP, socket.TCP_NODELAY)),
                keepalive=bool(get(socket.SOL_SOCKET, socket.SO_KEEPALIVE)),
                keepidle=get(k.SOL_TCP, k.TCP_KEEPIDLE),
                keepintvl=get(k.SOL_TCP, k.TCP_KEEPINTVL),
                keepcnt=get(k.SOL_TCP, k.TCP_KEEPCNT),
                user_timeout=get(k.SOL_TCP, k.TCP_USER_TIMEOUT),
                congestion=get(k.SOL_TCP, k.TCP_CONGESTION, k.TCP_CA_NAME_MAX).split(b"\0", 1)[0].decode("ascii"),
                sndbuf=None,
                rcvbuf=None,
                tos=max(tos, 0),
                mark=get(socket.SOL_SOCKET, k.SO_MARK) & 0xFFFFFFFF,
                notsent_lowat=get(k.SOL_TCP, k.TCP_NOTSENT_LOWAT) & 0xFFFFFFFF,
            )


def create(state: ConnectionState) -> socket.socket:
    """Step 1: a new socket of the right family with SO_REUSEADDR; RestoreError if that fails."""
    try:
        sock = socket.socket(state.family, socket.SOCK_STREAM)
    except OSError as e:
        raise _oserror("socket()", e) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError as e:
        sock.close()
        raise _oserror("setsockopt(SO_REUSEADDR)", e) from None
    return sock


def fill(sock: socket.socket, state: ConnectionState, defaults: Defaults) -> None:
    """Steps 2-13 on `sock`, which is in repair mode. RestoreError names the step that failed.

    On failure the socket is left as it is: the caller closes it, which in
    repair mode sends nothing.
    """
    step = "bind()"
    set_ = sock.setsockopt
    try:
        sock.bind(state.local)
        if state.timestamp is not None:
            step = "setsockopt(TCP_TIMESTAMP)"
            set_(k.SOL_TCP, k.TCP_TIMESTAMP, _U32.pack(state.timestamp))
        step = "setsockopt(TCP_QUEUE_SEQ, send queue)"
        set_(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_SEND_QUEUE)
        set_(k.SOL_TCP, k.TCP_QUEUE_SEQ, _U32.pack(state.snd_seq))
        step = "setsockopt(TCP_QUEUE_SEQ, receive queue)"
        set_(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_RECV_QUEUE)
        set_(k.SOL_TCP, k.TCP_QUEUE_SEQ, _U32.pack(state.rcv_seq))
        # connect() sizes segments (mss_cache) from the MSS clamp, and nothing sizes them again
        # after repair options change it: clamp it for the connect, then clear the user MSS.
        segment = _segment_size(state)
        if segment:
            step = "setsockopt(TCP_MAXSEG) for the connect"
            set_(k.SOL_TCP, socket.TCP_MAXSEG, segment)
        step = "connect() in repair mode"
        sock.connect(state.remote)
        if segment:
            step = "setsockopt(TCP_MAXSEG, 0)"
            set_(k.SOL_TCP, socket.TCP_MAXSEG, 0)
        grown = 0
        if state.received:
            step = "writing the receive queue"
            grown |= _write_queue(sock, state.received, socket.SO_RCVBUF, k.SOCK_RCVBUF_LOCK)
        # Even with nothing to write: with the send queue selected, FIN_WAIT2's FIN below is marked sent, not sent.
        step = "setsockopt(TCP_REPAIR_QUEUE, send queue)"
        set_(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_SEND_QUEUE)
        if state.sent:
            step = "writing the send queue"
            grown |= _write_queue(sock, state.sent, socket.SO_SNDBUF, k.SOCK_SNDBUF_LOCK)
        step = "setsockopt(TCP_REPAIR_OPTIONS)"
        set_(k.SOL_TCP, k.TCP_REPAIR_OPTIONS, _repair_options(state))
        if state.state == TcpState.FIN_WAIT2:
            step = "shutdown(SHUT_WR) in repair mode"
            sock.shutdown(socket.SHUT_WR)
        step = "setsockopt(TCP_REPAIR_WINDOW)"
        w = state.window
        set_(k.SOL_TCP, k.TCP_REPAIR_WINDOW, _WINDOW.pack(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup))
        if state.rcv_shutdown:
            step = "shutdown(SHUT_RD)"
            sock.shutdown(socket.SHUT_RD)
    except OSError as e:
        raise _oserror(step, e) from None
    _set_options(sock, state, defaults, grown)


def _set_options(sock: socket.socket, state: ConnectionState, defaults: Defaults, grown: int) -> None:
    """Step 13: the user's options that differ from a fresh socket's, then the buffer locks if we raised one."""
    o, d = state.options, defaults.options
    calls: list[tuple[str, int, int, int | bytes]] = []
    if o.nodelay != d.nodelay:
        calls.append(("TCP_NODELAY", k.SOL_TCP, socket.TCP_NODELAY, int(o.nodelay)))
    if o.keepidle != d.keepidle:
        calls.append(("TCP_KEEPIDLE", k.SOL_TCP, k.TCP_KEEPIDLE, o.keepidle))
    if o.keepintvl != d.keepintvl:
        calls.append(("TCP_KEEPINTVL", k.SOL_TCP, k.TCP_KEEPINTVL, o.keepintvl))
    if o.keepcnt != d.keepcnt:
        calls.append(("TCP_KEEPCNT", k.SOL_TCP, k.TCP_KEEPCNT, o.keepcnt))
    if o.keepalive != d.keepalive:
        calls.append(("SO_KEEPALIVE", socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(o.keepalive)))
    if o.user_timeout != d.user_timeout:
        calls.append(("TCP_USER_TIMEOUT", k.SOL_TCP, k.TCP_USER_TIMEOUT, o.user_timeout))
    if o.congestion and o.congestion != d.congestion:
        calls.append(("TCP_CONGESTION", k.SOL_TCP, k.TCP_CONGESTION, o.congestion.encode("ascii")))
    if o.tos != d.tos:
        if state.family == socket.AF_INET6:
            calls.append(("IPV6_TCLASS", socket.IPPROTO_IPV6, k.IPV6_TCLASS, o.tos))
        else:
            calls.append(("IP_TOS", socket.IPPROTO_IP, k.IP_TOS, o.tos))
    if o.mark != d.mark:
        calls.append(("SO_MARK", socket.SOL_SOCKET, k.SO_MARK, _U32.pack(o.mark)))
    if o.notsent_lowat != d.notsent_lowat:
        calls.append(("TCP_NOTSENT_LOWAT", k.SOL_TCP, k.TCP_NOTSENT_LOWAT, _U32.pack(o.notsent_lowat)))
    if o.sndbuf is not None or o.rcvbuf is not None or grown:
        calls += _buffer_calls(o)
    for name, level, option, value in calls:
        try:
            sock.setsockopt(level, option, value)
        except OSError as e:
            raise _oserror(f"setsockopt({name})", e) from None


def _buffer_calls(o: SocketOptions) -> list[tuple[str, int, int, int | bytes]]:
    """Put the buffer sizes and locks back as the application had them."""
    calls: list[tuple[str, int, int, int | bytes]] = []
    # The kernel doubles what is set and reports the doubled size: set half to find the same again.
    if o.sndbuf is not None:
        calls.append(("SO_SNDBUF", socket.SOL_SOCKET, socket.SO_SNDBUF, o.sndbuf // 2))
    if o.rcvbuf is not None:
        calls.append(("SO_RCVBUF", socket.SOL_SOCKET, socket.SO_RCVBUF, o.rcvbuf // 2))
    locks = (k.SOCK_SNDBUF_LOCK if o.sndbuf is not None else 0) | (k.SOCK_RCVBUF_LOCK if o.rcvbuf is not None else 0)
    calls.append(("SO_BUF_LOCK", socket.SOL_SOCKET, k.SO_BUF_LOCK, locks))
    return calls


def _segment_size(state: ConnectionState) -> int:
    """The segment size the source would use: the MSS clamp, at most half the peer's largest window.

    The kernel bounds segments to half the window (tcp_bound_to_half_wnd); without that bound a
    peer with a small window only gets bytes from the persist timer. 0 if TCP_MAXSEG cannot say it.
    """
    size = min(state.mss, _MAX_USER_MSS)
    max_window = state.window.max_window
    cutoff = max_window >> 1 if max_window > _TCP_MSS_DEFAULT else max_window
    if cutoff:
        # The kernel takes the options off the clamp but bounds the result to half the window: a clamp
        # of `cutoff` alone would make segments 12 bytes short, and more of them than fit the source's buffer.
        size = min(size, cutoff + (_TCPOLEN_TSTAMP_ALIGNED if state.timestamp is not None else 0))
    return size if size >= _TCP_MIN_MSS else 0


def _repair_options(state: ConnectionState) -> bytes:
    opts = _OPTION.pack(k.TCPOPT_MAXSEG, state.mss)
    if state.window_scaling:
        opts += _OPTION.pack(k.TCPOPT_WINDOW, state.snd_wscale | state.rcv_wscale << 16)
    if state.sack:
        opts += _OPTION.pack(k.TCPOPT_SACK_PERM, 0)
    if state.timestamp is not None:
        opts += _OPTION.pack(k.TCPOPT_TIMESTAMP, 0)
    return opts


def _write_queue(sock: socket.socket, data: bytes | memoryview, bufopt: int, lock: int) -> int:
    """Write `data` into the selected queue; raise its buffer once if it is full. Return the lock bit if raised."""
    view = memoryview(data)
    grown = 0
    while view:
        try:
            view = view[sock.send(view, socket.MSG_DONTWAIT) :]
            continue
        except (BlockingIOError, MemoryError):
            pass
        except OSError as e:
            if e.errno not in (errno.ENOMEM, errno.ENOBUFS):
                raise
        if grown:
            raise OSError(errno.ENOBUFS, f"{len(view)} bytes do not fit the raised buffer")
        # The kernel doubles what is set; the queue's bytes plus their overhead then fit.
        sock.setsockopt(socket.SOL_SOCKET, bufopt, 2 * len(data) + 65536)
        grown = lock
    return grown


def finish(sock: socket.socket, state: ConnectionState) -> None:
    """Steps 14-15 on `sock`, now out of repair mode. RestoreError names the step that failed.

    The unsent bytes go into the send queue without waiting; if the new
    socket's send buffer is too small for the whole queue, it is raised for
    them and the application's buffer settings are put back after.
    """
    step = "send() of the unsent bytes"
    try:
        if state.unsent and _write_queue(sock, state.unsent, socket.SO_SNDBUF, k.SOCK_SNDBUF_LOCK):
            for name, level, option, value in _buffer_calls(state.options):
                step = f"setsockopt({name})"
                sock.setsockopt(level, option, value)
        if state.state in (TcpState.FIN_WAIT1, TcpState.LAST_ACK, TcpState.CLOSING):
            step = "shutdown(SHUT_WR)"
            sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        raise _oserror(step, e) from None
