"""Read one connection out of a socket that is in repair mode.

The steps, on a socket already switched to repair mode (SPEC §6):

 1. TCP_INFO (its first 8 bytes): the TCP state, which options are on
    (SACK, timestamps, window scaling), both window scales.
 2. TCP_MAXSEG, which in repair mode is the MSS clamp; TCP_TIMESTAMP, the
    current timestamp value, if timestamps are on.
 3. TCP_REPAIR_WINDOW.
 4. Select the send queue: SIOCOUTQ (bytes not acknowledged), SIOCOUTQNSD
    (bytes not sent), peek the queue's bytes, TCP_QUEUE_SEQ (the sequence
    number after its last byte).
 5. Select the receive queue: SIOCINQ, peek its bytes, TCP_QUEUE_SEQ.
 6. The addresses, and the socket options the application set.
 7. Take the FINs out: after this side shut down sending, the send
    counters and sequence count its FIN; after the peer's FIN arrived, the
    receive sequence and `rcv_wup` count it. The record holds neither.

The socket is left in repair mode and otherwise unchanged (SO_PEEK_OFF is
put back if the application had set it): closing it sends nothing, and
switching repair off resumes it where it stopped.

Peeking uses MSG_DONTWAIT on a view of the descriptor that never polls
first: a Python socket with a timeout would wait for the send queue to be
readable, which in repair mode it never is (SPEC §7).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from . import _linux as k
from .state import MOVABLE_STATES, ConnectionState, RepairWindow, SocketOptions, TcpState

__all__ = ["DumpError", "dump", "rcv_shutdown"]

_U32 = struct.Struct("I")
_INT = struct.Struct("i")
_WINDOW = struct.Struct("5I")
_INFO = struct.Struct("BBBBBBB")
_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_IOCTL_BUF = bytes(4)


class DumpError(Exception):
    """A socket that cannot be read out: not in repair mode, not a movable state, or a call failed."""


def _ioctl(fd: int, request: int) -> int:
    result: int = _INT.unpack(fcntl.ioctl(fd, request, _IOCTL_BUF))[0]
    return result


def _peek(view: socket.socket, expected: int, what: str) -> bytes:
    if expected == 0:
        return b""
    # One byte more than announced: a longer queue shows up as a mismatch instead of being cut.
    data = view.recv(expected + 1, _FLAGS)
    if len(data) != expected:
        raise DumpError(f"{what} queue holds {len(data)} bytes where the kernel counts {expected}")
    return data


def rcv_shutdown(fd: int) -> bool:
    """Whether reading has ended on `fd` (peer's FIN, or shutdown(SHUT_RD)): poll reports POLLRDHUP."""
    import select

    poller = select.poll()
    poller.register(fd, k.POLLRDHUP)
    return bool(poller.poll(0))


def dump(fd: int, *, rcv_shutdown: bool | None = None) -> ConnectionState:
    """The state of the connection on `fd`, a TCP socket in repair mode (steps 1-7 above).

    `rcv_shutdown`: whether reading has ended, when the caller polled many
    sockets at once; None polls this one. Raises DumpError naming the step
    that failed; the socket is unchanged then too.
    """
    # AF_INET6 sizes the address buffer for both families; the kernel's reply says which it is.
    view = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 0, fd)
    steps = _Steps()
    try:
        return _dump(view, fd, rcv_shutdown, steps)
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, f"errno {e.errno}")
        raise DumpError(f"{steps.now}: {name} ({os.strerror(e.errno or 0)})") from None
    finally:
        view.detach()


class _Steps:
    """The step being run, for the error message if a call fails."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = ""


def _dump(view: socket.socket, fd: int, shut_rd: bool | None, steps: _Steps) -> ConnectionState:
    steps.now = "getsockopt(TCP_REPAIR)"
    if not view.getsockopt(k.SOL_TCP, k.TCP_REPAIR):
        raise DumpError("socket is not in repair mode")

    steps.now = "getsockopt(TCP_INFO)"
    state_no, _, _, _, _, options, scales = _INFO.unpack(view.getsockopt(k.SOL_TCP, k.TCP_INFO, _INFO.size))
    try:
        state = TcpState(state_no)
    except ValueError:
        raise DumpError(f"unknown TCP state {state_no}") from None
    if state not in MOVABLE_STATES:
        raise DumpError(f"cannot move a connection in state {state.name}")
    wscale = bool(options & k.TCPI_OPT_WSCALE)

    steps.now = "getsockopt(TCP_MAXSEG)"
    mss = view.getsockopt(k.SOL_TCP, socket.TCP_MAXSEG)
    timestamp = None
    if options & k.TCPI_OPT_TIMESTAMPS:
        steps.now = "getsockopt(TCP_TIMESTAMP)"
        timestamp = view.getsockopt(k.SOL_TCP, k.TCP_TIMESTAMP) & 0xFFFFFFFF

    steps.now = "getsockopt(TCP_REPAIR_WINDOW)"
    snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = _WINDOW.unpack(
        view.getsockopt(k.SOL_TCP, k.TCP_REPAIR_WINDOW, _WINDOW.size)
    )

    steps.now = "getsockopt(SO_PEEK_OFF)"
    peek_off = view.getsockopt(socket.SOL_SOCKET, k.SO_PEEK_OFF)
    if peek_off != -1:
        view.setsockopt(socket.SOL_SOCKET, k.SO_PEEK_OFF, -1)
    try:
        fin_out = 1 if state.fin_sent else 0
        # The FIN counts in SIOCOUTQ until acknowledged (FIN_WAIT2: it was), in SIOCOUTQNSD until sent.
        fin_unacked = 1 if state.fin_sent and state != TcpState.FIN_WAIT2 else 0
        steps.now = "setsockopt(TCP_REPAIR_QUEUE, send queue)"
        view.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_SEND_QUEUE)
        steps.now = "ioctl(SIOCOUTQ)"
        outq = _ioctl(fd, k.SIOCOUTQ) - fin_unacked
        steps.now = "ioctl(SIOCOUTQNSD)"
        notsent = _ioctl(fd, k.SIOCOUTQNSD)
        if notsent and fin_out:
            notsent -= 1
        if not 0 <= notsent <= outq:
            raise DumpError(f"send queue counts disagree: {outq} bytes unacknowledged, {notsent} not sent")
        steps.now = "recv(MSG_PEEK) on the send queue"
        send_queue = _peek(view, outq, "send")
        steps.now = "getsockopt(TCP_QUEUE_SEQ, send queue)"
        write_seq = _U32.unpack(view.getsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ, 4))[0]

        steps.now = "setsockopt(TCP_REPAIR_QUEUE, receive queue)"
        view.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_RECV_QUEUE)
        steps.now = "ioctl(SIOCINQ)"
        inq = _ioctl(fd, k.SIOCINQ)  # the kernel leaves the peer's FIN out of this count itself
        steps.now = "recv(MSG_PEEK) on the receive queue"
        received = _peek(view, inq, "receive")
        steps.now = "getsockopt(TCP_QUEUE_SEQ, receive queue)"
        rcv_nxt = _U32.unpack(view.getsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ, 4))[0]
    finally:
        if peek_off != -1:
            view.setsockopt(socket.SOL_SOCKET, k.SO_PEEK_OFF, peek_off)

    steps.now = "getsockname()"
    local = view.getsockname()[:2]
    steps.now = "getpeername()"
    remote = view.getpeername()[:2]
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    user = _options(view, family, steps)

    fin_in = 1 if state.fin_received else 0
    if shut_rd is None:
        shut_rd = rcv_shutdown(fd)
    split = len(send_queue) - notsent
    return ConnectionState(
        local=local,
        remote=remote,
        state=state,
        snd_seq=(write_seq - fin_out - len(send_queue)) & 0xFFFFFFFF,
        rcv_seq=(rcv_nxt - fin_in - len(received)) & 0xFFFFFFFF,
        mss=mss,
        window_scaling=wscale,
        snd_wscale=scales & 0xF if wscale else 0,
        rcv_wscale=scales >> 4 if wscale else 0,
        sack=bool(options & k.TCPI_OPT_SACK),
        timestamp=timestamp,
        # Moving rcv_wup back with the FIN keeps the right edge the peer was told (rcv_wup + rcv_wnd).
        window=RepairWindow(
            snd_wl1, snd_wnd, max_window, (rcv_wnd + fin_in) & 0xFFFFFFFF, (rcv_wup - fin_in) & 0xFFFFFFFF
        ),
        sent=send_queue[:split] if notsent else send_queue,
        unsent=send_queue[split:] if notsent else b"",
        received=received,
        rcv_shutdown=bool(shut_rd or fin_in),
        options=user,
    )


def _options(view: socket.socket, family: socket.AddressFamily, steps: _Steps) -> SocketOptions:
    """Step 6: the options an application sets."""
    get = view.getsockopt
    steps.now = "getsockopt(SO_BUF_LOCK)"
    try:
        locks = get(socket.SOL_SOCKET, k.SO_BUF_LOCK)
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT:
            raise
        locks = 0  # before Linux 5.14 there is no telling; treat the sizes as the kernel's own
    steps.now = "getsockopt(TCP_CONGESTION)"
    congestion = get(k.SOL_TCP, k.TCP_CONGESTION, k.TCP_CA_NAME_MAX).split(b"\0", 1)[0].decode("ascii")
    steps.now = "getsockopt() of a user option"
    return SocketOptions(
        nodelay=bool(get(k.SOL_TCP, socket.TCP_NODELAY)),
        keepalive=bool(get(socket.SOL_SOCKET, socket.SO_KEEPALIVE)),
        keepidle=get(k.SOL_TCP, k.TCP_KEEPIDLE),
        keepintvl=get(k.SOL_TCP, k.TCP_KEEPINTVL),
        keepcnt=get(k.SOL_TCP, k.TCP_KEEPCNT),
        user_timeout=get(k.SOL_TCP, k.TCP_USER_TIMEOUT),
        congestion=congestion,
        sndbuf=get(socket.SOL_SOCKET, socket.SO_SNDBUF) if locks & k.SOCK_SNDBUF_LOCK else None,
        rcvbuf=get(socket.SOL_SOCKET, socket.SO_RCVBUF) if locks & k.SOCK_RCVBUF_LOCK else None,
        tos=get(socket.IPPROTO_IPV6, k.IPV6_TCLASS) if family == socket.AF_INET6 else get(socket.IPPROTO_IP, k.IP_TOS),
        mark=get(socket.SOL_SOCKET, k.SO_MARK) & 0xFFFFFFFF,
    )
