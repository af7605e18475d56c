# SPDX-License-Identifier: GPL-2.0-or-later
"""Live moves between hosts: peer, source and target are network namespaces on a bridge.

The service address lives on the source; the peer's connections to it carry
numbered byte streams both ways while they move to the target, in the order
of docs/migration.md:

 1. the source stops receiving for the service address (it is removed there);
 2. the source's sockets are frozen in repair mode and dumped;
 3. the target, cut off from the bridge, takes the address and restores them;
 4. the target is reattached and announces the address (gratuitous ARP,
    unsolicited neighbour advertisement), repair mode goes off, the unsent
    tails go out; the source closes its frozen sockets.

The processes holding the connections have no capability at all; each
host's passt-repair helper has CAP_NET_ADMIN alone. Afterwards every stream
must be complete, in order, without duplicates, no side may have seen a
reset, and the TCP options must be what they were.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netns import Topology, ip_batch
from support import SETPRIV_NET_ADMIN_ONLY, SETPRIV_NO_CAPS, Helper

WORKER = str(Path(__file__).with_name("migration_worker.py"))
PORT = 5000


class Worker:
    """tests/migration_worker.py in a host's namespace, without capabilities."""

    def __init__(self, net: Topology, host: str) -> None:
        self.host = host
        argv = ["ip", "netns", "exec", net.ns(host), *SETPRIV_NO_CAPS, sys.executable, "-u", WORKER]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def call(self, op: str, timeout: float = 60, **args: Any) -> Any:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"{self.host} worker gave no answer to {op}: {err.decode()[-2000:]}")
        reply = json.loads(line)
        if isinstance(reply, dict) and "error" in reply:
            raise AssertionError(f"{self.host} worker, {op}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call("exit", timeout=10)
            self.proc.kill()
        self.proc.communicate()


class Hosts:
    """The topology, a worker per host, and a helper per host that moves connections."""

    def __init__(self, net: Topology, tmp_path: Path) -> None:
        self.net = net
        self.tmp = tmp_path
        self.workers = {h: Worker(net, h) for h in ("peer", "source", "target")}
        self.helpers: list[Helper] = []

    def __getitem__(self, host: str) -> Worker:
        return self.workers[host]

    def attach_helper(self, host: str) -> None:
        """Start passt-repair (CAP_NET_ADMIN only, in the host's namespace) and have the worker accept it."""
        directory = self.tmp / host
        directory.mkdir()
        prefix = ["ip", "netns", "exec", self.net.ns(host), *SETPRIV_NET_ADMIN_ONLY]
        self.helpers.append(Helper(str(directory), prefix=prefix))
        self[host].call("repair_server", path=str(directory / f"{host}.repair"))

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        for helper in self.helpers:
            helper.kill()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with Topology(["peer", "source", "target"]) as net:
        net.add_addresses("source", [net.service4], [net.service6])
        h = Hosts(net, tmp_path)
        try:
            yield h
        finally:
            h.close()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30, show: Callable[[], Any] = str) -> Any:
    """Poll `check` until it returns something true; fail naming `what`, with `show()` for context."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {show()}")
        time.sleep(0.02)


def move(
    h: Hosts,
    keys: list[str],
    before_dump: Callable[[], None] = lambda: None,
    after_dump: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The order of docs/migration.md, step by step; returns what checkpoint, restore and resume said."""
    net = h.net
    services = ([net.service4], [net.service6])
    before_dump()
    net.del_addresses("source", *services)  # 1. the source stops receiving
    h.attach_helper("source")
    frozen = h["source"].call("checkpoint", out=str(h.tmp / "states"))  # 2. freeze and dump
    assert frozen["failures"] == []
    assert sorted(frozen["states"]) == sorted(keys)
    after_dump()
    net.cut("target")  # 3. the target, cut off, takes the address and restores
    net.add_addresses("target", *services)
    h.attach_helper("target")
    restored = h["target"].call("restore", file=str(h.tmp / "states"))
    assert restored["failures"] == []
    net.attach("target")  # 4. reattach, announce, repair off, unsent tails
    net.announce("target", *services)
    resumed = h["target"].call("resume", apps=str(h.tmp / "states.json"))
    assert resumed["failures"] == []
    h["source"].call("close_frozen")
    return {"frozen": frozen["states"], "clamps": restored["clamps"]}


def finish_and_check(h: Hosts, keys: list[str], timeout: float = 40) -> None:
    """End every stream, wait for both ends to read end of file, and check every byte."""
    h["peer"].call("set", keys=keys, streaming=False, shut_after=True, reading=True)
    h["target"].call("set", keys=keys, streaming=False, shut_after=True, reading=True)

    def done() -> tuple[dict[str, Any], dict[str, Any]] | None:
        peer, target = h["peer"].call("report", keys=keys), h["target"].call("report", keys=keys)
        for side in (peer, target):
            for key, r in side.items():
                assert not r["errors"], f"{key}: {r['errors']}"
        if all(peer[k]["eof"] and target[k]["eof"] and peer[k]["shut_wr"] and target[k]["shut_wr"] for k in keys):
            return peer, target
        return None

    peer, target = wait_for(done, "every stream to end on both sides", timeout)
    for key in keys:
        p, t = peer[key], target[key]
        assert not p["reset"], f"{key}: the peer saw a reset"
        assert not t["reset"], f"{key}: the target saw a reset"
        assert p["out_off"] == t["in_off"], f"{key}: peer sent {p['out_off']}, target read {t['in_off']}"
        assert t["out_off"] == p["in_off"], f"{key}: target sent {t['out_off']}, peer read {p['in_off']}"


STREAM = {"chunk": 1024, "every": 1}
#: Bytes in flight without acknowledgement that the test waits for (the congestion window caps them).
UNACKED = 8 << 10


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_live_move_keeps_every_byte(hosts: Hosts, family: int) -> None:
    """Streams, non-empty queues, and each closing state move from the source to the target, losing nothing.

    The peer's acknowledgements are dropped for a moment before the move
    (a blackhole route on the peer), so the source holds data and FINs
    that were sent but never acknowledged.
    """
    h, net = hosts, hosts.net
    service = net.service4 if family == 4 else net.service6
    names = ["stream1", "stream2", "unread", "unacked", "unsent", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK"]
    h["source"].call("listen", addrs=[[service, PORT]], defaults=STREAM)
    conns = [{"name": n, "addr": [service, PORT], "rcvbuf": 4096 if n == "unsent" else None} for n in names]
    key = h["peer"].call("connect", conns=conns, defaults=STREAM)["keys"]
    keys = list(key.values())
    wait_for(lambda: h["source"].call("count")["count"] == len(names), "the source to accept every connection")
    time.sleep(0.2)  # streams running

    # Queues and closing states that need the peer's acknowledgements.
    src, peer = h["source"], h["peer"]
    src.call("set", keys=[key["unread"], key["CLOSE_WAIT"]], reading=False)
    peer.call("set", keys=[key["unsent"]], reading=False)
    src.call("set", keys=[key["unsent"]], burst=256 << 10)
    src.call("set", keys=[key["FIN_WAIT2"]], streaming=False, shut_after=True)
    peer.call("set", keys=[key["CLOSE_WAIT"], key["LAST_ACK"]], streaming=False, shut_after=True, burst=4096)

    def source_states() -> dict[str, Any]:
        return {name: r for name, r in zip(names, src.call("report", keys=keys).values(), strict=True)}

    wait_for(
        lambda: (
            (s := source_states())["FIN_WAIT2"]["state"] == "FIN_WAIT2"
            and s["CLOSE_WAIT"]["state"] == "CLOSE_WAIT"
            and s["LAST_ACK"]["eof"]
            and s["unsent"]["notsent"] > 0
            and s["unread"]["inq"] > 0
        ),
        "FIN_WAIT2, CLOSE_WAIT, unsent and unread bytes on the source",
        show=source_states,
    )
    before = source_states()

    def drop_acks() -> None:
        blackhole = "route add blackhole " + (f"{service}/32" if family == 4 else f"{service}/128")
        ip_batch(net.ns("peer"), [blackhole])
        src.call("set", keys=[key["unacked"]], burst=64 << 10)
        src.call("set", keys=[key["FIN_WAIT1"], key["LAST_ACK"]], streaming=False, shut_after=True)
        wait_for(
            lambda: (
                (s := source_states())["FIN_WAIT1"]["state"] == "FIN_WAIT1"
                and s["LAST_ACK"]["state"] == "LAST_ACK"
                and s["unacked"]["outq"] - s["unacked"]["notsent"] >= UNACKED
            ),
            "unacknowledged bytes and FINs on the source",
            show=source_states,
        )

    def pass_acks() -> None:
        ip_batch(net.ns("peer"), ["route del blackhole " + (f"{service}/32" if family == 4 else f"{service}/128")])

    moved = move(h, keys, before_dump=drop_acks, after_dump=pass_acks)

    frozen = {name: moved["frozen"][key[name]] for name in names}
    assert frozen["unread"]["received"] > 0
    assert frozen["CLOSE_WAIT"]["received"] > 0
    assert frozen["unacked"]["sent"] >= UNACKED
    assert frozen["unsent"]["unsent"] > 0
    for state in ("FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK"):
        assert frozen[state]["state"] == state
    for name in ("stream1", "stream2", "unread", "unacked", "unsent"):
        assert frozen[name]["state"] == "ESTABLISHED"
    for name in names:
        assert moved["clamps"][key[name]] == frozen[name]["mss"], f"{name}: MSS clamp"

    target = h["target"]
    target.call("set", keys=[key["unread"], key["CLOSE_WAIT"]], reading=True)
    peer.call("set", keys=[key["unsent"]], reading=True)
    after = dict(zip(names, target.call("report", keys=keys).values(), strict=True))
    for name in names:
        assert after[name]["options"] == before[name]["options"], f"{name}: SACK, timestamps, window scales"
        if name in ("stream1", "stream2"):
            assert after[name]["maxseg"] == before[name]["maxseg"], f"{name}: segment size"
    time.sleep(0.3)  # the streams go on from the target

    finish_and_check(h, keys)
    final = dict(zip(names, h["peer"].call("report", keys=keys).values(), strict=True))
    assert final["unacked"]["in_off"] >= frozen["unacked"]["sent"]
    assert final["unsent"]["in_off"] >= 256 << 10


def test_thousand_connections_in_one_move(hosts: Hosts) -> None:
    """1,000 connections, half IPv4 and half IPv6, each streaming both ways, move in one migration."""
    h, net = hosts, hosts.net
    slow = {"chunk": 64, "every": 20}
    h["source"].call("listen", addrs=[[net.service4, PORT], [net.service6, PORT]], defaults=slow)
    conns = [{"name": f"c{i}", "addr": [net.service4 if i % 2 else net.service6, PORT]} for i in range(1000)]
    keys = list(h["peer"].call("connect", conns=conns, defaults=slow)["keys"].values())
    wait_for(lambda: h["source"].call("count")["count"] == 1000, "the source to accept 1,000 connections")
    time.sleep(0.5)
    moved = move(h, keys)
    assert len(moved["frozen"]) == 1000
    time.sleep(0.5)
    finish_and_check(h, keys, timeout=60)
