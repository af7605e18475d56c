# SPDX-License-Identifier: GPL-2.0-or-later
"""Read one connection out of a socket that is in repair mode.

The steps, on a socket already switched to repair mode (docs/migration.md
has the kernel's side of each; docs/performance.md why each call stays):

 1. TCP_INFO (up to tcpi_pacing_rate): the TCP state, which options are on
    (SACK, timestamps, window scaling), both window scales, the pacing rate.
    A caller that read them before the switch passes them in
    (`probe(info=...)`).
 2. TCP_MAXSEG, which in repair mode is the MSS clamp; TCP_TIMESTAMP, the
    current timestamp value, if timestamps are on, plus the pacing lead
    (`pacing_lead`): the record's value is never below a TSval already sent.
 3. TCP_REPAIR_WINDOW (EPERM here: the socket is not in repair mode).
 4. The queues' lengths: SIOCOUTQ (bytes not acknowledged), SIOCOUTQNSD
    (bytes not sent), SIOCINQ (bytes not read); none depends on the queue
    selected.
 5. Select the receive queue: TCP_QUEUE_SEQ (the sequence number after its
    last byte).
 6. The addresses, and the socket options the application set.
 7. Peek the receive queue's bytes (SO_PEEK_OFF off meanwhile, if the
    application had set it), select the send queue, read its
    TCP_QUEUE_SEQ, peek its bytes.
 8. Take the FINs out: after this side shut down sending, the send
    counters and sequence count its FIN; after the peer's FIN arrived, the
    receive sequence and `rcv_wup` count it. The record holds neither.

Steps 1-6 are `probe`, step 7-8 `Probe.read_queues`: a caller dumping many
sockets probes them all first, so that it knows every queue's length and
can peek each queue straight into its place in one buffer.

The socket is left in repair mode, with the send queue selected, and
otherwise unchanged (SO_PEEK_OFF is put back): closing it sends nothing,
and switching repair off resumes it where it stopped.

Every step works on a view of the descriptor, a socket object the caller
makes (`view`) and detaches when done. Peeking uses MSG_DONTWAIT on it,
never polling first: a Python socket with a timeout would wait for the
send queue to be readable, which in repair mode it never is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct

from . import _linux as k
from .state import MOVABLE_STATES, ConnectionState, RepairWindow, SocketOptions, TcpState, assemble

__all__ = ["INFO_SIZE", "DumpError", "Probe", "dump", "probe", "reading_ended", "view"]

_U32 = struct.Struct("I")
_INT = struct.Struct("i")
_WINDOW = struct.Struct("5I")
# struct tcp_info up to tcpi_pacing_rate: state, ca_state, retransmits, probes, backoff, options, wscales, ...
_INFO = struct.Struct("=7B97xQ")
#: Twice the largest segment TCP builds without BIG TCP (GSO_LEGACY_MAX_SIZE): see `pacing_lead`.
_PACED_BYTES = 2 * 65536
_UNPACED = (0, 0xFFFFFFFFFFFFFFFF)
#: How much of TCP_INFO the dump reads.
INFO_SIZE = _INFO.size
_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_IOCTL_BUF = bytes(4)
_STATES = {s.value: s for s in TcpState}


class DumpError(Exception):
    """A socket that cannot be read out: not in repair mode, not a movable state, or a call failed."""


def view(fd: int) -> socket.socket:
    """A socket object on `fd` for the steps; detach it when done (closing it would close `fd`)."""
    # AF_INET6 sizes the address buffer for both families; the kernel's reply says which it is.
    return socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 0, fd)


def _ioctl(fd: int, request: int) -> int:
    result: int = _INT.unpack(fcntl.ioctl(fd, request, _IOCTL_BUF))[0]
    return result


def _oserror(step: str, e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, f"errno {e.errno}")
    return f"{step}: {name} ({os.strerror(e.errno or 0)})"


def reading_ended(fd: int) -> bool:
    """Whether reading has ended on `fd` (peer's FIN, or shutdown(SHUT_RD)): poll reports POLLRDHUP."""
    poller = select.poll()
    poller.register(fd, k.POLLRDHUP)
    return bool(poller.poll(0))


def dump(fd: int, *, rcv_shutdown: bool | None = None) -> ConnectionState:
    """The state of the connection on `fd`, a TCP socket in repair mode (steps 1-8 above).

    `rcv_shutdown`: whether reading has ended, when the caller polled many
    sockets at once; None polls this one. Raises DumpError naming the step
    that failed; the socket is unchanged then too.
    """
    on_fd = view(fd)
    try:
        return probe(on_fd, rcv_shutdown=rcv_shutdown).read_queues(None, None)
    finally:
        on_fd.detach()


class Probe:
    """Steps 1-6 done on one socket: everything but the queues' bytes (`read_queues`).

    `send_len` and `recv_len` say how many bytes the queues hold, so a
    caller can give `read_queues` room for them in a buffer of its own.
    `view` is the caller's view of the socket, used again by `read_queues`.
    """

    __slots__ = (
        "fin_in", "fin_out", "local", "mss", "notsent", "options", "rcv_nxt", "recv_len", "remote", "scales",
        "send_len", "shut_rd", "state", "timestamp", "user", "view", "window", "write_seq",
    )  # fmt: skip
    view: socket.socket
    state: TcpState
    options: int
    scales: int
    mss: int
    timestamp: int | None
    window: tuple[int, int, int, int, int]
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

    def __init__(self, on_fd: socket.socket) -> None:
        self.view = on_fd

    def read_queues(self, send_into: memoryview | None, recv_into: memoryview | None) -> ConnectionState:
        """Steps 7-8: peek both queues (into the buffers given, of exactly their lengths, or into new bytes)."""
        on_fd = self.view
        received: bytes | memoryview = b""
        step = "getsockopt(SO_PEEK_OFF)"
        try:
            if self.recv_len:  # the peek offset applies to the receive queue only (the send queue's peek ignores it)
                # An application's peek offset would make the peek skip the bytes it already peeked at.
                peek_off = on_fd.getsockopt(socket.SOL_SOCKET, k.SO_PEEK_OFF)
                if peek_off != -1:
                    step = "setsockopt(SO_PEEK_OFF)"
                    on_fd.setsockopt(socket.SOL_SOCKET, k.SO_PEEK_OFF, -1)
                try:
                    step = "recv(MSG_PEEK) on the receive queue"
                    received = _peek(on_fd, self.recv_len, recv_into, "receive")
                finally:
                    if peek_off != -1:
                        step = "setsockopt(SO_PEEK_OFF)"
                        on_fd.setsockopt(socket.SOL_SOCKET, k.SO_PEEK_OFF, peek_off)
            step = "setsockopt(TCP_REPAIR_QUEUE, send queue)"
            on_fd.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_SEND_QUEUE)
            step = "getsockopt(TCP_QUEUE_SEQ, send queue)"
            self.write_seq = _U32.unpack(on_fd.getsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ, 4))[0]
            step = "recv(MSG_PEEK) on the send queue"
            send_queue = _peek(on_fd, self.send_len, send_into, "send")
        except OSError as e:
            raise DumpError(_oserror(step, e)) from None
        return self._state(send_queue, received)

    def _state(self, send_queue: bytes | memoryview, received: bytes | memoryview) -> ConnectionState:
        fin_in, scales, wscale = self.fin_in, self.scales, self.options & k.TCPI_OPT_WSCALE
        snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = self.window
        notsent = self.notsent
        split = len(send_queue) - notsent
        # Moving rcv_wup back with the FIN keeps the right edge the peer was told (rcv_wup + rcv_wnd).
        window = assemble(
            RepairWindow,
            {
                "snd_wl1": snd_wl1,
                "snd_wnd": snd_wnd,
                "max_window": max_window,
                "rcv_wnd": (rcv_wnd + fin_in) & 0xFFFFFFFF,
                "rcv_wup": (rcv_wup - fin_in) & 0xFFFFFFFF,
            },
        )
        return assemble(
            ConnectionState,
            {
                "local": self.local,
                "remote": self.remote,
                "state": self.state,
                "snd_seq": (self.write_seq - self.fin_out - len(send_queue)) & 0xFFFFFFFF,
                "rcv_seq": (self.rcv_nxt - fin_in - len(received)) & 0xFFFFFFFF,
                "mss": self.mss,
                "window_scaling": bool(wscale),
                "snd_wscale": scales & 0xF if wscale else 0,
                "rcv_wscale": scales >> 4 if wscale else 0,
                "sack": bool(self.options & k.TCPI_OPT_SACK),
                "timestamp": self.timestamp,
                "window": window,
                "sent": send_queue[:split] if notsent else send_queue,
                "unsent": send_queue[split:] if notsent else b"",
                "received": received,
                "rcv_shutdown": self.shut_rd or bool(fin_in),
                "options": self.user,
            },
        )


def _peek(on_fd: socket.socket, length: int, into: memoryview | None, what: str) -> bytes | memoryview:
    """The selected queue's `length` bytes, peeked into `into` (returned read-only) or into new bytes."""
    if not length:
        return b""
    if into is not None:
        if on_fd.recv_into(into, length, _FLAGS) != length:
            raise DumpError(f"{what} queue holds fewer bytes than the kernel counted ({length})")
        return into.toreadonly()
    # One byte more than announced: a longer queue shows up as a mismatch instead of being cut.
    data = on_fd.recv(length + 1, _FLAGS)
    if len(data) != length:
        raise DumpError(f"{what} queue holds {len(data)} bytes where the kernel counts {length}")
    return data


def probe(on_fd: socket.socket, *, rcv_shutdown: bool | None = None, info: bytes | None = None) -> Probe:
    """Steps 1-6 on the socket `on_fd` views, without the queues' bytes; DumpError naming the step that failed.

    `rcv_shutdown`: as for `dump`. `info`: TCP_INFO's first INFO_SIZE bytes, if the
    caller read them and knows the state cannot have changed since (None
    reads them).
    """
    found = Probe(on_fd)
    fd = on_fd.fileno()
    get = on_fd.getsockopt
    step = "getsockopt(TCP_INFO)"
    try:
        if info is None:
            info = get(k.SOL_TCP, k.TCP_INFO, _INFO.size)
        state_no, _, _, _, _, options, scales, pacing_rate = _INFO.unpack(info)
        state = _STATES.get(state_no)
        if state is None:
            raise DumpError(f"unknown TCP state {state_no}")
        if state not in MOVABLE_STATES:
            raise DumpError(f"cannot move a connection in state {state.name}")
        found.state, found.options, found.scales = state, options, scales

        step = "getsockopt(TCP_MAXSEG)"
        found.mss = get(k.SOL_TCP, socket.TCP_MAXSEG)
        found.timestamp = None
        if options & k.TCPI_OPT_TIMESTAMPS:
            step = "getsockopt(TCP_TIMESTAMP)"
            found.timestamp = timestamp_ahead(get(k.SOL_TCP, k.TCP_TIMESTAMP), pacing_rate)

        step = "getsockopt(TCP_REPAIR_WINDOW)"
        found.window = _WINDOW.unpack(get(k.SOL_TCP, k.TCP_REPAIR_WINDOW, _WINDOW.size))

        found.fin_out = fin_out = 1 if state.fin_sent else 0
        # The FIN counts in SIOCOUTQ until acknowledged (FIN_WAIT2: it was), in SIOCOUTQNSD until sent.
        fin_unacked = 1 if fin_out and state is not TcpState.FIN_WAIT2 else 0
        step = "ioctl(SIOCOUTQ)"
        found.send_len = outq = _ioctl(fd, k.SIOCOUTQ) - fin_unacked
        step = "ioctl(SIOCOUTQNSD)"
        notsent = _ioctl(fd, k.SIOCOUTQNSD)
        if notsent and fin_out:
            notsent -= 1
        if not 0 <= notsent <= outq:
            raise DumpError(f"send queue counts disagree: {outq} bytes unacknowledged, {notsent} not sent")
        found.notsent = notsent
        step = "ioctl(SIOCINQ)"
        found.recv_len = _ioctl(fd, k.SIOCINQ)  # the kernel leaves the peer's FIN out of this count itself

        step = "setsockopt(TCP_REPAIR_QUEUE, receive queue)"
        on_fd.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_RECV_QUEUE)
        step = "getsockopt(TCP_QUEUE_SEQ, receive queue)"
        found.rcv_nxt = _U32.unpack(get(k.SOL_TCP, k.TCP_QUEUE_SEQ, 4))[0]

        step = "getsockname()"
        found.local = local = on_fd.getsockname()[:2]
        step = "getpeername()"
        found.remote = on_fd.getpeername()[:2]
        step = "getsockopt(SO_BUF_LOCK)"
        try:
            locks = get(socket.SOL_SOCKET, k.SO_BUF_LOCK)
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT:
                raise
            locks = 0  # before Linux 5.14 there is no telling; treat the sizes as the kernel's own
        step = "getsockopt() of a user option"
        found.user = _options(on_fd, ":" in local[0], locks)
    except OSError as e:
        if e.errno == errno.EPERM and step == "getsockopt(TCP_REPAIR_WINDOW)":
            raise DumpError("socket is not in repair mode") from None
        raise DumpError(_oserror(step, e)) from None
    found.fin_in = 1 if state.fin_received else 0
    found.shut_rd = reading_ended(fd) if rcv_shutdown is None else rcv_shutdown
    return found


def pacing_lead(pacing_rate: int) -> int:
    """Milliseconds by which segments already sent may carry a TSval ahead of TCP_TIMESTAMP's clock.

    With pacing (internal, as bbr or SO_MAX_PACING_RATE ask for, or by the
    fq qdisc) the kernel stamps each segment with its earliest departure
    time, tcp_wstamp_ns, and the TSval written into it comes from that
    stamp; after each paced transmission the stamp moves on by the
    segment's length at the pacing rate, ahead of the clock. TCP_TIMESTAMP
    reads the clock itself, so the last TSval the peer saw can be above it
    by up to one segment's worth of pacing time. A segment is at most 64 KiB
    (GSO_LEGACY_MAX_SIZE); twice that at the current rate covers a rate that
    has risen since, and 1 to 2 ms more the rounding to milliseconds and to
    an even value. An unpaced socket (rate 0 or unlimited) stamps the clock
    itself: no lead. The lead is even: since Linux 6.7 the lowest bit of TCP_TIMESTAMP says
    whether the socket counts in microseconds, and setting the value with
    that bit flipped would switch the target's clock to the other unit.
    """
    if pacing_rate in _UNPACED:
        return 0
    return (2 + -(-_PACED_BYTES * 1000 // pacing_rate)) & ~1


def timestamp_ahead(timestamp: int, pacing_rate: int) -> int:
    """TCP_TIMESTAMP's value plus the pacing lead, in the socket's own unit, as an unsigned 32-bit value.

    Its lowest bit says the unit: set, the socket counts in microseconds
    (Linux 6.7 and later, with the route's tcp_usec_ts), and the lead in
    milliseconds is scaled to match; the lead is even in both units, so
    the bit is kept.
    """
    lead = pacing_lead(pacing_rate)
    return (timestamp + (lead * 1000 if timestamp & 1 else lead)) & 0xFFFFFFFF


def _options(on_fd: socket.socket, ipv6: bool, locks: int) -> SocketOptions:
    """Step 6: the options an application sets."""
    get = on_fd.getsockopt
    return assemble(
        SocketOptions,
        {
            "nodelay": bool(get(k.SOL_TCP, socket.TCP_NODELAY)),
            "keepalive": bool(get(socket.SOL_SOCKET, socket.SO_KEEPALIVE)),
            "keepidle": get(k.SOL_TCP, k.TCP_KEEPIDLE),
            "keepintvl": get(k.SOL_TCP, k.TCP_KEEPINTVL),
            "keepcnt": get(k.SOL_TCP, k.TCP_KEEPCNT),
            "user_timeout": get(k.SOL_TCP, k.TCP_USER_TIMEOUT),
            "congestion": get(k.SOL_TCP, k.TCP_CONGESTION, k.TCP_CA_NAME_MAX).split(b"\0", 1)[0].decode("ascii"),
            "sndbuf": get(socket.SOL_SOCKET, socket.SO_SNDBUF) if locks & k.SOCK_SNDBUF_LOCK else None,
            "rcvbuf": get(socket.SOL_SOCKET, socket.SO_RCVBUF) if locks & k.SOCK_RCVBUF_LOCK else None,
            "tos": get(socket.IPPROTO_IPV6, k.IPV6_TCLASS) if ipv6 else get(socket.IPPROTO_IP, k.IP_TOS),
            "mark": get(socket.SOL_SOCKET, k.SO_MARK) & 0xFFFFFFFF,
            "notsent_lowat": get(k.SOL_TCP, k.TCP_NOTSENT_LOWAT) & 0xFFFFFFFF,
        },
    )
