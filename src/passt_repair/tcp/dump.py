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

__all__ = ["DumpError", "Probe", "dump", "probe", "rcv_shutdown"]

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
    found = probe(fd, rcv_shutdown=rcv_shutdown)
    return found.read_queues(None, None)


class Probe:
    """Steps 1-6 done on one socket, all but reading the queues' bytes (`read_queues`, step 4-5's peeks).

    `send_len` and `recv_len` say how many bytes the queues hold, so a
    caller can give `read_queues` room for them in a buffer of its own.
    Until `read_queues` runs, the socket's SO_PEEK_OFF may be off.
    """

    __slots__ = (
        "fd", "fin_in", "fin_out", "local", "mss", "notsent", "options", "peek_off", "rcv_nxt", "recv_len",
        "remote", "scales", "send_len", "shut_rd", "state", "timestamp", "user", "window", "write_seq",
    )  # fmt: skip
    fd: int
    state: TcpState
    options: int
    scales: int
    mss: int
    timestamp: int | None
    window: tuple[int, int, int, int, int]
    peek_off: int
    fin_out: int
    fin_in: int
    send_len: int
    notsent: int
    write_seq: int
    recv_len: int
    rcv_nxt: int
    local: tuple[str, int]
    remote: tuple[str, int]
    user: SocketOptions
    shut_rd: bool

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read_queues(self, send_into: memoryview | None, recv_into: memoryview | None) -> ConnectionState:
        """Peek both queues (into the buffers given, of exactly their lengths, or into new bytes)."""
        view = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 0, self.fd)
        steps = _Steps()
        try:
            received = _peek_queue(view, self.recv_len, recv_into, "receive", steps)
            steps.now = "setsockopt(TCP_REPAIR_QUEUE, send queue)"
            view.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_SEND_QUEUE)
            send_queue = _peek_queue(view, self.send_len, send_into, "send", steps)
            if self.peek_off != -1:
                steps.now = "setsockopt(SO_PEEK_OFF)"
                view.setsockopt(socket.SOL_SOCKET, k.SO_PEEK_OFF, self.peek_off)
        except OSError as e:
            raise DumpError(_oserror(steps.now, e)) from None
        finally:
            view.detach()
        return self._state(send_queue, received)

    def _state(self, send_queue: bytes | memoryview, received: bytes | memoryview) -> ConnectionState:
        fin_in, fin_out, scales, wscale = self.fin_in, self.fin_out, self.scales, self.options & k.TCPI_OPT_WSCALE
        snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = self.window
        split = len(send_queue) - self.notsent
        return ConnectionState(
            local=self.local,
            remote=self.remote,
            state=self.state,
            snd_seq=(self.write_seq - fin_out - len(send_queue)) & 0xFFFFFFFF,
            rcv_seq=(self.rcv_nxt - fin_in - len(received)) & 0xFFFFFFFF,
            mss=self.mss,
            window_scaling=bool(wscale),
            snd_wscale=scales & 0xF if wscale else 0,
            rcv_wscale=scales >> 4 if wscale else 0,
            sack=bool(self.options & k.TCPI_OPT_SACK),
            timestamp=self.timestamp,
            # Moving rcv_wup back with the FIN keeps the right edge the peer was told (rcv_wup + rcv_wnd).
            window=RepairWindow(
                snd_wl1, snd_wnd, max_window, (rcv_wnd + fin_in) & 0xFFFFFFFF, (rcv_wup - fin_in) & 0xFFFFFFFF
            ),
            sent=send_queue[:split] if self.notsent else send_queue,
            unsent=send_queue[split:] if self.notsent else b"",
            received=received,
            rcv_shutdown=bool(self.shut_rd or fin_in),
            options=self.user,
        )


def _oserror(step: str, e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, f"errno {e.errno}")
    return f"{step}: {name} ({os.strerror(e.errno or 0)})"


def _peek_queue(
    view: socket.socket, length: int, into: memoryview | None, what: str, steps: _Steps
) -> bytes | memoryview:
    steps.now = f"recv(MSG_PEEK) on the {what} queue"
    if into is None:
        return _peek(view, length, what)
    if length and view.recv_into(into, length, _FLAGS) != length:
        raise DumpError(f"{what} queue holds fewer bytes than the kernel counted ({length})")
    return into.toreadonly()


def probe(fd: int, *, rcv_shutdown: bool | None = None) -> Probe:
    """Steps 1-6 on `fd` without the queues' bytes; DumpError naming the step that failed."""
    # AF_INET6 sizes the address buffer for both families; the kernel's reply says which it is.
    view = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 0, fd)
    steps = _Steps()
    try:
        return _probe(view, fd, rcv_shutdown, steps)
    except OSError as e:
        raise DumpError(_oserror(steps.now, e)) from None
    finally:
        view.detach()


class _Steps:
    """The step being run, for the error message if a call fails."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = ""


def _probe(view: socket.socket, fd: int, shut_rd: bool | None, steps: _Steps) -> Probe:
    found = Probe(fd)
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
    found.state, found.options, found.scales = state, options, scales

    steps.now = "getsockopt(TCP_MAXSEG)"
    found.mss = view.getsockopt(k.SOL_TCP, socket.TCP_MAXSEG)
    found.timestamp = None
    if options & k.TCPI_OPT_TIMESTAMPS:
        steps.now = "getsockopt(TCP_TIMESTAMP)"
        found.timestamp = view.getsockopt(k.SOL_TCP, k.TCP_TIMESTAMP) & 0xFFFFFFFF

    steps.now = "getsockopt(TCP_REPAIR_WINDOW)"
    found.window = _WINDOW.unpack(view.getsockopt(k.SOL_TCP, k.TCP_REPAIR_WINDOW, _WINDOW.size))

    steps.now = "getsockopt(SO_PEEK_OFF)"
    found.peek_off = view.getsockopt(socket.SOL_SOCKET, k.SO_PEEK_OFF)
    if found.peek_off != -1:
        view.setsockopt(socket.SOL_SOCKET, k.SO_PEEK_OFF, -1)
    found.fin_out = fin_out = 1 if state.fin_sent else 0
    # The FIN counts in SIOCOUTQ until acknowledged (FIN_WAIT2: it was), in SIOCOUTQNSD until sent.
    fin_unacked = 1 if fin_out and state != TcpState.FIN_WAIT2 else 0
    steps.now = "setsockopt(TCP_REPAIR_QUEUE, send queue)"
    view.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_SEND_QUEUE)
    steps.now = "ioctl(SIOCOUTQ)"
    found.send_len = outq = _ioctl(fd, k.SIOCOUTQ) - fin_unacked
    steps.now = "ioctl(SIOCOUTQNSD)"
    notsent = _ioctl(fd, k.SIOCOUTQNSD)
    if notsent and fin_out:
        notsent -= 1
    if not 0 <= notsent <= outq:
        raise DumpError(f"send queue counts disagree: {outq} bytes unacknowledged, {notsent} not sent")
    found.notsent = notsent
    steps.now = "getsockopt(TCP_QUEUE_SEQ, send queue)"
    found.write_seq = _U32.unpack(view.getsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ, 4))[0]

    steps.now = "setsockopt(TCP_REPAIR_QUEUE, receive queue)"
    view.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_RECV_QUEUE)
    steps.now = "ioctl(SIOCINQ)"
    found.recv_len = _ioctl(fd, k.SIOCINQ)  # the kernel leaves the peer's FIN out of this count itself
    steps.now = "getsockopt(TCP_QUEUE_SEQ, receive queue)"
    found.rcv_nxt = _U32.unpack(view.getsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ, 4))[0]

    steps.now = "getsockname()"
    found.local = view.getsockname()[:2]
    steps.now = "getpeername()"
    found.remote = view.getpeername()[:2]
    family = socket.AF_INET6 if ":" in found.local[0] else socket.AF_INET
    found.user = _options(view, family, steps)
    found.fin_in = 1 if state.fin_received else 0
    found.shut_rd = rcv_shutdown(fd) if shut_rd is None else shut_rd
    return found


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
