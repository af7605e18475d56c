# SPDX-License-Identifier: GPL-2.0-or-later
"""A process that holds connections for test_migration_netns.py: the peer, the source or the target.

It runs inside one host's network namespace with no capability at all
(SETPRIV_NO_CAPS): repair mode is switched by a passt-repair helper that
connects to its RepairServer. It reads one JSON command per line on stdin
and answers each with one JSON line on stdout; between commands it keeps
every stream going.

Each connection carries two numbered byte streams: 4-byte big-endian
counters, from 0 for what the peer sends and from 2^31 for what the server
side sends. The reader checks every byte against the counter it expects at
that offset, so a byte lost, repeated or out of order shows up at once.
The application state that moves with a connection (how far each stream
got, what the application was doing) travels beside the kernel state.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import selectors
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from passt_repair.server import RepairServer
from passt_repair.tcp import Restored, TcpState, checkpoint, decode, encode, restore, resume

TICK = 0.01
LIMIT = 4 << 20  # longest stream, per direction and connection


def _counters(start: int) -> bytes:
    words = array.array("I", range(start, start + LIMIT // 4))
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()


PATTERNS = (_counters(0), _counters(1 << 31))  # peer -> server, server -> peer


class Stream:
    """One connection and where its two streams are."""

    def __init__(self, key: str, sock: socket.socket, out: int, app: dict[str, Any] | None = None) -> None:
        self.key = key
        self.sock = sock
        self.out = out  # which pattern this side writes
        self.out_off = 0
        self.in_off = 0
        self.reading = True
        self.streaming = True
        self.chunk = 1024
        self.every = 1
        self.burst = 0
        self.shut_after = False
        self.shut_wr = False
        self.eof = False
        self.reset = False
        self.errors: list[str] = []
        self.watched = False
        if app:
            self.__dict__.update(app)
        sock.setblocking(False)

    APP = ("out_off", "in_off", "reading", "streaming", "chunk", "every", "burst", "shut_after", "shut_wr", "eof")

    def app(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.APP}

    def read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(e)
            return
        if not data:
            self.eof = True
            return
        expected = PATTERNS[1 - self.out][self.in_off : self.in_off + len(data)]
        if data != expected:
            at = next((i for i, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b), len(expected))
            self.errors.append(f"stream in: wrong bytes at offset {self.in_off + at}")
        self.in_off += len(data)

    def write(self, tick: int) -> None:
        if self.shut_wr or self.reset:
            return
        amount = self.burst or (self.chunk if self.streaming and tick % self.every == 0 else 0)
        if amount:
            try:
                sent = self.sock.send(PATTERNS[self.out][self.out_off : self.out_off + amount])
            except BlockingIOError:
                return
            except OSError as e:
                self.fail(e)
                return
            self.out_off += sent
            self.burst = max(0, self.burst - sent)
        if self.shut_after and not self.burst and not self.streaming:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                self.fail(e)
                return
            self.shut_wr = True

    def fail(self, e: OSError) -> None:
        self.reset = self.reset or isinstance(e, (ConnectionResetError, BrokenPipeError))
        self.errors.append(f"{type(e).__name__}: {e}")

    def facts(self) -> dict[str, Any]:
        s = self.sock
        try:
            info = s.getsockopt(socket.IPPROTO_TCP, 11, 8)
            queues = [
                struct.unpack("i", fcntl.ioctl(s.fileno(), request, b"\0" * 4))[0]
                for request in (0x5411, 0x894B, 0x541B)  # SIOCOUTQ, SIOCOUTQNSD, SIOCINQ
            ]
            maxseg = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        except OSError as e:
            return {"state": f"error: {e}"}
        try:
            state = TcpState(info[0]).name
        except ValueError:
            state = str(info[0])
        return {
            "state": state,
            "options": [info[5], info[6] & 0xF, info[6] >> 4],
            "maxseg": maxseg,
            "outq": queues[0],
            "notsent": queues[1],
            "inq": queues[2],
        }

    def report(self) -> dict[str, Any]:
        return {**self.app(), "reset": self.reset, "errors": self.errors, **self.facts()}


class Worker:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.streams: dict[str, Stream] = {}
        self.listeners: list[socket.socket] = []
        self.frozen: list[Stream] = []
        self.server: RepairServer | None = None
        self.restored: Restored | None = None
        self.defaults: dict[str, Any] = {}
        self.tick = 0
        self.inbuf = b""
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, None)

    def add(self, stream: Stream) -> None:
        self.streams[stream.key] = stream
        self.watch(stream)

    def watch(self, stream: Stream, frozen: bool = False) -> None:
        """Poll the socket for reading exactly when the application reads it."""
        wanted = stream.reading and not stream.eof and not stream.reset and not frozen
        if wanted and not stream.watched:
            self.sel.register(stream.sock, selectors.EVENT_READ, stream)
        elif stream.watched and not wanted:
            self.sel.unregister(stream.sock)
        stream.watched = wanted

    def run(self) -> None:
        next_tick = time.monotonic()
        while True:
            for key, _ in self.sel.select(max(0.0, next_tick - time.monotonic())):
                if key.data is None:
                    if not self.stdin():
                        return
                elif isinstance(key.data, Stream):
                    key.data.read()
                    self.watch(key.data)
                else:
                    self.accept(key.fileobj)  # type: ignore[arg-type]
            if time.monotonic() >= next_tick:
                self.tick += 1
                for stream in self.streams.values():
                    stream.write(self.tick)
                next_tick = time.monotonic() + TICK

    def stdin(self) -> bool:
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.inbuf += chunk
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            command = json.loads(line)
            try:
                reply = getattr(self, "op_" + command.pop("op"))(**command)
            except Exception as e:  # the test reads the reason; the worker stays up
                reply = {"error": f"{type(e).__name__}: {e}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
            if reply == {"bye": True}:
                return False
        return True

    def accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except BlockingIOError:
            return
        stream = Stream(f"{addr[0]}|{addr[1]}", sock, out=1)
        stream.__dict__.update(self.defaults)
        self.add(stream)

    # -- commands ------------------------------------------------------------

    def op_listen(self, addrs: list[list[Any]], defaults: dict[str, Any]) -> dict[str, Any]:
        self.defaults = defaults
        for host, port in addrs:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            lst = socket.socket(family, socket.SOCK_STREAM)
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind((host, port))
            lst.listen(4096)
            lst.setblocking(False)
            self.listeners.append(lst)
            self.sel.register(lst, selectors.EVENT_READ, "listener")
        return {"ok": True}

    def op_connect(self, conns: list[dict[str, Any]], defaults: dict[str, Any]) -> dict[str, Any]:
        keys = {}
        for c in conns:
            host, port = c["addr"]
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            if c.get("rcvbuf"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, c["rcvbuf"])
            sock.settimeout(10)
            sock.connect((host, port))
            local = sock.getsockname()
            stream = Stream(f"{local[0]}|{local[1]}", sock, out=0)
            stream.__dict__.update(defaults)
            self.add(stream)
            keys[c["name"]] = stream.key
        return {"keys": keys}

    def op_count(self) -> dict[str, Any]:
        return {"count": len(self.streams)}

    def op_set(self, keys: list[str], **fields: Any) -> dict[str, Any]:
        for key in keys:
            stream = self.streams[key]
            stream.__dict__.update(fields)
            self.watch(stream)
        return {"ok": True}

    def op_report(self, keys: list[str] | None = None) -> dict[str, Any]:
        return {key: self.streams[key].report() for key in (keys or list(self.streams))}

    def op_repair_server(self, path: str) -> dict[str, Any]:
        self.server = RepairServer(path, reply_timeout=20)
        info = self.server.accept(timeout=20)
        return {"helper_pid": info.pid}

    def op_checkpoint(self, out: str) -> dict[str, Any]:
        assert self.server is not None
        streams = list(self.streams.values())
        for stream in streams:
            self.watch(stream, frozen=True)
        self.streams.clear()
        self.frozen = streams
        frozen = checkpoint([s.sock for s in streams], self.server)
        Path(out).write_bytes(encode(frozen.states))
        apps = {streams[i].key: streams[i].app() for i in frozen.indices}
        Path(out + ".json").write_text(json.dumps(apps))
        summary = {
            streams[i].key: {
                "state": st.state.name,
                "sent": len(st.sent),
                "unsent": len(st.unsent),
                "received": len(st.received),
                "mss": st.mss,
                "options": [st.window_scaling, st.snd_wscale, st.rcv_wscale, st.sack, st.timestamp is not None],
            }
            for i, st in zip(frozen.indices, frozen.states, strict=True)
        }
        return {"states": summary, "failures": [str(f) for f in frozen.failures]}

    def op_close_frozen(self) -> dict[str, Any]:
        for stream in self.frozen:
            stream.sock.close()
        self.frozen = []
        return {"ok": True}

    def op_restore(self, file: str) -> dict[str, Any]:
        assert self.server is not None
        states = decode(Path(file).read_bytes())
        self.restored = restore(states, self.server)
        clamps = {}
        for st, sock in self.restored.live():
            clamps[f"{st.remote[0]}|{st.remote[1]}"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        return {"failures": [str(f) for f in self.restored.failures], "clamps": clamps}

    def op_resume(self, apps: str) -> dict[str, Any]:
        assert self.server is not None
        assert self.restored is not None
        resume(self.restored, self.server)
        app_state = json.loads(Path(apps).read_text())
        for st, sock in self.restored.live():
            key = f"{st.remote[0]}|{st.remote[1]}"
            self.add(Stream(key, sock, out=1, app=app_state[key]))
        self.server.close()
        return {"failures": [str(f) for f in self.restored.failures]}

    def op_exit(self) -> dict[str, Any]:
        for stream in self.streams.values():
            stream.sock.close()
        if self.server is not None:
            self.server.close()
        return {"bye": True}


if __name__ == "__main__":
    Worker().run()
