# SPDX-License-Identifier: GPL-2.0-or-later
"""Network namespaces as hosts on a bridge, for migration tests and the benchmark.

    with Topology(["peer", "source", "target"]) as net:
        net.add_address("source", net.service4)
        net.cut("target")          # its link to the bridge down (no carrier)
        net.attach("target")
        net.announce("target", [net.service4, net.service6])

Every host is a namespace with one interface, `eth0`, whose other end is a
port of a bridge in a namespace of its own; the names carry the test
process's pid, and everything is deleted on exit, failures included.
Addresses come from 198.18.0.0/15 and 2001:db8::/32. IPv6 duplicate address
detection is off, so an address is usable the moment it is added.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import subprocess
from collections.abc import Iterator, Sequence

CLONE_NEWNET = 0x40000000


def run(*argv: str) -> str:
    """Run a command; raise with its stderr if it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def ip_batch(ns: str | None, commands: Sequence[str]) -> None:
    """Several `ip` commands in one process (`ip -batch`), in namespace `ns`."""
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    done = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip -batch in {ns}: {done.stderr.strip()}")


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the block with this thread in network namespace `ns` (sockets made there stay there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")
    finally:
        os.close(home)
        os.close(target)


class Topology:
    """Hosts (network namespaces) on one bridge; see the module docstring."""

    def __init__(self, hosts: Sequence[str], tag: str = "", mtu: int = 1500) -> None:
        self.prefix = f"prm{os.getpid()}{tag}"
        self.bridge_ns = f"{self.prefix}-br"
        self.hosts = list(hosts)
        self.mtu = mtu
        #: Each host's own address (index i: .i+1, ::i+1); the service addresses move between hosts.
        self.v4 = {h: f"198.18.0.{i + 1}" for i, h in enumerate(self.hosts)}
        self.v6 = {h: f"2001:db8::{i + 1:x}" for i, h in enumerate(self.hosts)}
        self.service4 = "198.18.0.100"
        self.service6 = "2001:db8::100"
        self._made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        for ns in [self.bridge_ns, *map(self.ns, self.hosts)]:
            run("ip", "netns", "add", ns)
            self._made.append(ns)
        bridge = ["link add br0 type bridge", "link set br0 up", "link set lo up"]
        for host in self.hosts:
            bridge += [
                f"link add {host} mtu {self.mtu} type veth peer name eth0 netns {self.ns(host)} mtu {self.mtu}",
                f"link set {host} master br0",
                f"link set {host} up",
            ]
        ip_batch(self.bridge_ns, bridge)
        for host in self.hosts:
            ns = self.ns(host)
            run(
                "ip", "netns", "exec", ns, "sysctl", "-qw",
                "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.eth0.accept_dad=0",
            )  # fmt: skip
            ip_batch(
                ns,
                [
                    "link set lo up",
                    f"addr add {self.v4[host]}/16 dev eth0",
                    f"addr add {self.v6[host]}/64 dev eth0 nodad",
                    "link set eth0 up",
                ],
            )

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._made.clear()

    # -- what a test does to the network -------------------------------------

    def add_addresses(self, host: str, v4: Sequence[str] = (), v6: Sequence[str] = ()) -> None:
        ip_batch(
            self.ns(host),
            [f"addr add {a}/32 dev eth0" for a in v4] + [f"addr add {a}/128 dev eth0 nodad" for a in v6],
        )

    def del_addresses(self, host: str, v4: Sequence[str] = (), v6: Sequence[str] = ()) -> None:
        ip_batch(self.ns(host), [f"addr del {a}/32 dev eth0" for a in v4] + [f"addr del {a}/128 dev eth0" for a in v6])

    def cut(self, host: str) -> None:
        """Cut `host` off the bridge: its port goes down, its eth0 loses carrier (addresses and routes stay)."""
        ip_batch(self.bridge_ns, [f"link set {host} down"])

    def attach(self, host: str) -> None:
        """Connect `host` to the bridge again."""
        ip_batch(self.bridge_ns, [f"link set {host} up"])

    def mac(self, host: str) -> bytes:
        with entered(self.ns(host)), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            reply = fcntl.ioctl(s, 0x8927, struct.pack("16s24x", b"eth0"))  # SIOCGIFHWADDR
        return reply[18:24]

    def announce(self, host: str, v4: Sequence[str] = (), v6: Sequence[str] = ()) -> None:
        """Tell the segment that `host` now has these addresses: gratuitous ARP, unsolicited NA."""
        mac = self.mac(host)
        with entered(self.ns(host)):
            ifindex = socket.if_nametoindex("eth0")
            if v4:
                with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                    raw.bind(("eth0", 0x0806))
                    for addr in v4:
                        raw.send(garp_frame(mac, socket.inet_aton(addr)))
            for addr in v6:
                with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as icmp:
                    icmp.bind((addr, 0, 0, ifindex))
                    icmp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                    icmp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                    na = unsolicited_na(mac, socket.inet_pton(socket.AF_INET6, addr))
                    icmp.sendto(na, ("ff02::1", 0, 0, ifindex))


def garp_frame(mac: bytes, ip: bytes) -> bytes:
    """A gratuitous ARP request: who has `ip`? tell `ip`, at `mac`; broadcast."""
    ether = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\0" * 6 + ip
    return ether + arp


def unsolicited_na(mac: bytes, ip6: bytes) -> bytes:
    """An ICMPv6 neighbour advertisement with the override flag and our link-layer address (checksum by the kernel)."""
    override = 0x20000000
    return struct.pack("!BBHI", 136, 0, 0, override) + ip6 + struct.pack("!BB", 2, 1) + mac


class Loopback:
    """A network namespace of its own with only `lo`, entered by this thread, that can be cut off and reattached.

        with Loopback() as lo:      # sockets made in the block live in the namespace
            lo.cut()                # every packet on lo dropped (addresses and routes stay)
            lo.attach()

    For moves on one host: between closing a frozen socket and restoring it,
    a segment from the peer meets no socket and draws a reset, unless the
    host is cut off meanwhile, as a moving address is.
    """

    _count = 0

    def __init__(self) -> None:
        Loopback._count += 1
        self.ns = f"prm{os.getpid()}-lo{Loopback._count}"
        self._entered: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> Loopback:
        run("ip", "netns", "add", self.ns)
        try:
            ip_batch(self.ns, ["link set lo up"])
            self._entered = entered(self.ns)
            self._entered.__enter__()
        except BaseException:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._entered is not None:
                self._entered.__exit__(None, None, None)
        finally:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)

    def cut(self) -> None:
        """Drop every packet on lo: a token bucket of one byte passes none (this kernel has no netem)."""
        run("ip", "netns", "exec", self.ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1kbit",
            "burst", "1", "latency", "1ms")  # fmt: skip

    def attach(self) -> None:
        run("ip", "netns", "exec", self.ns, "tc", "qdisc", "del", "dev", "lo", "root")
