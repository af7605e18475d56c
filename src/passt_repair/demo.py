# SPDX-License-Identifier: GPL-2.0-or-later
"""passt-repair-demo: move a live TCP connection into a new socket, through the real helper.

Everything happens on this machine, on loopback: a peer connects to a
server; they exchange bytes; the server starts passt-repair as a
subprocess, gives up CAP_NET_ADMIN itself, and has the helper freeze the
connection's socket in repair mode; the socket's state (sequence numbers,
queues, options) is read, encoded, decoded, and put into a brand-new
socket, which the helper then brings to life. The peer never reconnects:
bytes flow both ways on the same connection before and after the move.

Needs CAP_NET_ADMIN for the helper. Without it, the demo re-runs itself
in a private user and network namespace (`unshare -Urn`), where it has
the capability for that namespace's sockets. In a new network namespace
loopback starts down: the demo brings it up, however it got there.

Exit status: 0 when the connection moved and carried bytes after the
move, 1 on any failure (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import HelperInfo, RepairServer

__all__ = ["main"]

PROG = "passt-repair-demo"
USAGE = f"usage: {PROG} [--help]"
HELP = f"""{USAGE}

Move a live TCP connection into a brand-new socket through repair mode,
with the real passt-repair helper doing the switching, and show that the
same connection carries bytes before and after the move.

Needs CAP_NET_ADMIN (run as root); without it, the demo re-runs itself in
a private namespace with `unshare -Urn`. To do that by hand:

    unshare -Urn {PROG}

exit status: 0 on success, 1 on failure, 2 on a usage error."""

CAP_NET_ADMIN = 12
#: Set in the environment of the re-run inside `unshare -Urn`, so it does not try again.
_UNSHARED = "PASST_REPAIR_DEMO_UNSHARED"
_NO_CAPABILITY = (
    "no CAP_NET_ADMIN here, and a private namespace did not give it either: "
    f"run as root, or in a user and network namespace: unshare -Urn {PROG}"
)


_UNREAD = b"still unread when the socket froze"


class DemoError(Exception):
    """A step of the demo failed; the message is the one line the user sees."""


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN in its effective set."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_net_admin() -> None:
    """Give up CAP_NET_ADMIN for good in this process (capset(2)); from now on only the helper has it."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), f"capget: {os.strerror(ctypes.get_errno())}")
    data[0].effective &= ~(1 << CAP_NET_ADMIN)
    data[0].permitted &= ~(1 << CAP_NET_ADMIN)
    data[0].inheritable &= ~(1 << CAP_NET_ADMIN)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), f"capset: {os.strerror(ctypes.get_errno())}")


def loopback_up() -> bool:
    """Bring `lo` up if it is down (a new network namespace starts so); return whether it was down."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, siocgifflags, request))[1]
        if flags & iff_up:
            return False
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))
        return True


def helper_command() -> list[str]:
    """The installed passt-repair next to this interpreter, or this interpreter running the package."""
    script = Path(sys.executable).with_name("passt-repair")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-I", "-m", "passt_repair"]


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise DemoError(f"connection ended after {len(data)} of {size} bytes")
        data += chunk
    return data


def _exchange(say: Callable[[str], None], a: socket.socket, b: socket.socket, a_name: str, message: bytes) -> None:
    a.sendall(message)
    got = _recv_exactly(b, len(message))
    if got != message:
        raise DemoError(f"sent {message!r}, the other end read {got!r}")
    say(f"   {a_name} sent {message.decode()!r}: arrived intact")


def _helper_said(helper: subprocess.Popen[bytes]) -> str:
    """What the helper wrote to stderr but its "connected" notice, as one line (it has exited, or is killed now)."""
    try:
        _, err = helper.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        helper.kill()
        _, err = helper.communicate()
    lines = [line.strip() for line in err.decode(errors="replace").splitlines()]
    return "; ".join(line for line in lines if line and " connected to " not in line)


def _accept(server: RepairServer, helper: subprocess.Popen[bytes], timeout: float) -> HelperInfo:
    """The helper's connection; a helper that exits first (no capability, say) ends the wait at once."""
    from .server import NoHelperError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return server.accept(timeout=0.05)
        except NoHelperError:
            if helper.poll() is not None:
                said = _helper_said(helper)
                raise DemoError(
                    f"the helper exited with status {helper.returncode} before connecting"
                    + (f": {said}" if said else "")
                ) from None
            if time.monotonic() > deadline:
                raise


def run(say: Callable[[str], None]) -> None:
    """The demo itself, in a process that holds CAP_NET_ADMIN; raises DemoError on failure."""
    from .protocol import SOL_TCP, TCP_REPAIR
    from .server import RepairError, RepairServer
    from .tcp import checkpoint, decode, encode, restore, resume

    workdir = Path(tempfile.mkdtemp(prefix="passt-repair-demo."))
    path = workdir / "demo.repair"
    helper: subprocess.Popen[bytes] | None = None
    closing: list[socket.socket] = []
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        closing.append(listener)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        peer = socket.create_connection(listener.getsockname()[:2], timeout=10)
        closing.append(peer)
        old, _ = listener.accept()
        closing.append(old)
        old.settimeout(10)
        port, peer_port = listener.getsockname()[1], peer.getsockname()[1]
        say(f"1. server listens on 127.0.0.1:{port}; a peer connected from port {peer_port}")
        say("2. bytes before the move, on the server's original socket:")
        _exchange(say, old, peer, "server", b"hello from the old socket")
        _exchange(say, peer, old, "peer", b"hello, old socket")
        peer.sendall(_UNREAD)
        say(f"   peer sent {len(_UNREAD)} more bytes; the server leaves them unread for now")

        with RepairServer(path, reply_timeout=10) as server:
            helper = subprocess.Popen([*helper_command(), str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            info = _accept(server, helper, timeout=10)
            say(f"3. started the helper: {' '.join(helper_command())} {path} (pid {info.pid}, uid {info.uid})")
            drop_net_admin()
            try:
                old.setsockopt(SOL_TCP, TCP_REPAIR, 1)
                raise DemoError("setting TCP_REPAIR worked without CAP_NET_ADMIN: the capability was not dropped")
            except PermissionError:
                pass
            say("4. server dropped CAP_NET_ADMIN: setting TCP_REPAIR itself now fails with EPERM")

            # Wait for the peer's unread bytes to be in the receive queue before freezing.
            old.recv(1, socket.MSG_PEEK)
            frozen = checkpoint([old], server)
            if frozen.failures:
                raise DemoError(f"checkpoint: {frozen.failures[0]}")
            state = frozen.states[0]
            say(f"5. checkpoint: the helper switched repair mode on; the socket is frozen in {state.state.name}")
            unread = len(state.received)
            say(f"   send sequence {state.snd_seq}, receive sequence {state.rcv_seq}, {unread} bytes unread")
            options = [o for o, on in (("SACK", state.sack), ("timestamps", state.timestamp is not None)) if on]
            say(
                f"   MSS {state.mss}, window scale {state.snd_wscale}/{state.rcv_wscale}"
                + (f", {' and '.join(options)}" if options else "")
            )
            data = encode(frozen.states)
            say(f"6. encoded the state: {len(data)} bytes; decoded again for the new socket")
            states = decode(data)
            old.close()
            closing.remove(old)
            say("7. closed the old socket (in repair mode that sends nothing: the peer sees no FIN, no reset)")

            restored = restore(states, server)
            if restored.failures:
                raise DemoError(f"restore: {restored.failures[0]}")
            new = restored.sockets[0]
            assert new is not None
            closing.append(new)
            send_seq, recv_seq = _queue_sequences(new)
            say(
                f"8. restore: a brand-new socket, repair mode on through the helper, bound to "
                f"{states[0].local[0]}:{states[0].local[1]} and connected without a handshake"
            )
            say(f"   its send queue ends at {send_seq}, its receive queue at {recv_seq}: the same connection")
            resume(restored, server)
            if restored.failures:
                raise DemoError(f"resume: {restored.failures[0]}")
            say("9. resume: the helper switched repair mode off; the new socket is live")
        _, helper_err = helper.communicate(timeout=10)
        status = helper.returncode
        if status != 0:
            raise DemoError(f"the helper exited with status {status}: {helper_err.decode().strip()}")
        say(f"10. closed the repair socket; the helper exited with status {status}")

        new.settimeout(10)
        waiting = _recv_exactly(new, len(_UNREAD))
        say(f"11. the new socket reads what waited in the old one: {waiting.decode()!r}")
        say("12. bytes after the move, on the new socket, same peer socket, same connection:")
        _exchange(say, new, peer, "server", b"hello from the new socket")
        _exchange(say, peer, new, "peer", b"hello, new socket")
        new.close()
        closing.remove(new)
        if peer.recv(1) != b"":
            raise DemoError("the peer did not see the connection end cleanly")
        say("13. the server closed the new socket; the peer read a clean end of file (no reset)")
    except (DemoError, RepairError, OSError, subprocess.SubprocessError) as e:
        unread = helper is not None and helper.stderr is not None and not helper.stderr.closed
        said = _helper_said(helper) if helper is not None and unread else ""
        raise DemoError(f"{e}" + (f"; the helper's log: {said}" if said else "") + _hint(said)) from None
    finally:
        for s in closing:
            s.close()
        if helper is not None and helper.poll() is None:
            helper.kill()
            helper.communicate()
        path.unlink(missing_ok=True)
        workdir.rmdir()


def _hint(said: str) -> str:
    """Why a helper with CAP_NET_ADMIN got EPERM here, when that is the likely reason."""
    if "EPERM" not in said or _in_initial_user_namespace():
        return ""
    return (
        f"; this user namespace's CAP_NET_ADMIN does not reach a network namespace it does not own: "
        f"give it one of its own, unshare -Urn {PROG}"
    )


def _in_initial_user_namespace() -> bool:
    return Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]


def _queue_sequences(sock: socket.socket) -> tuple[int, int]:
    """The ends of the send and receive queues of a socket in repair mode (no privilege needed to read)."""
    from .tcp import _linux as k

    sock.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_SEND_QUEUE)
    send_seq = struct.unpack("I", sock.getsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ, 4))[0]
    sock.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_RECV_QUEUE)
    recv_seq = struct.unpack("I", sock.getsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ, 4))[0]
    return send_seq, recv_seq


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 1


#: Ways to get CAP_NET_ADMIN for a private network namespace, tried in order. Mapping uid 0
#: (-r when the caller is root without capabilities) needs CAP_SETFCAP; keeping the capabilities
#: of the new user namespace across exec (--keep-caps, as ambient capabilities) does not.
_UNSHARE_WAYS = (["-Urn"], ["-Un", "--keep-caps"])


def _rerun_unshared(args: Sequence[str]) -> int:
    """Run the demo again inside a private user and network namespace; its output passes through."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return _error(f"no CAP_NET_ADMIN here, and no unshare(1) to make a private namespace: run {PROG} as root")
    env = dict(os.environ, **{_UNSHARED: "1"})
    print("No CAP_NET_ADMIN here: re-running in a private user and network namespace.", flush=True)
    failed = ""
    for way in _UNSHARE_WAYS:
        if failed:
            print(f"({failed}; trying unshare {' '.join(way)})", flush=True)
        argv = [unshare, *way, sys.executable, "-m", "passt_repair.demo", *args]
        child = subprocess.run(argv, env=env, stderr=subprocess.PIPE, check=False)
        err = child.stderr.decode(errors="replace").strip()
        if child.returncode == 0:
            return 0
        if not err.startswith("unshare:"):  # the demo ran and failed: its own one-line error
            print(err or f"{PROG}: error: exited with status {child.returncode}", file=sys.stderr, flush=True)
            return child.returncode
        failed = err.splitlines()[-1]
    return _error(f"no CAP_NET_ADMIN here, and no private namespace could be made ({failed}): run {PROG} as root")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(HELP)
        return 0
    if args:
        print(f"{PROG}: unexpected argument {args[0]} ({USAGE})", file=sys.stderr)
        return 2
    if not has_net_admin():
        if os.environ.get(_UNSHARED):
            return _error(_NO_CAPABILITY)
        return _rerun_unshared(args)
    try:
        if loopback_up():  # a new network namespace starts with it down, whoever made the namespace
            print("In a new network namespace: brought the loopback interface up.", flush=True)
        print("Moving a live TCP connection into a new socket through passt-repair:", flush=True)
        run(lambda line: print(line, flush=True))
    except DemoError as e:
        return _error(str(e))
    except OSError as e:
        return _error(f"{e.strerror or e}")
    print("Done: the connection moved to a new socket and carried bytes both ways after the move.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
