# SPDX-License-Identifier: GPL-2.0-or-later
"""How the privileged helper confines itself: one capability, no new privileges, a seccomp allow-list.

Whoever controls the socket the helper connects to can have TCP_REPAIR set on
their own sockets, and so forge TCP connections from any address. The helper
gives that power to the server it connects to and keeps nothing else an
attacker who took it over could use (docs/SECURITY.md). Before connecting,
`helper.check_start()` refuses to run without CAP_NET_ADMIN or (unless
allowed) without a filter for this machine, from /proc/self/status: this
module and ctypes are imported only once connected, so that their 3 ms come
after the server's accept(). Then, before anything is read from the server,
`cli` calls in order:

1. `lock_down()`: not dumpable, no new privileges.
2. `seccomp_filter()`: assemble the filter for this architecture.
3. `drop_for_connect()`: securebits locked, bounding set down to CAP_NET_ADMIN,
   inheritable and ambient sets empty, effective and permitted sets down to
   CAP_NET_ADMIN and, if held, CAP_DAC_OVERRIDE.
4. `confine()`: CAP_NET_ADMIN alone, filter on.

All of it happens once; nothing here runs per message. Standard library only:
ctypes reaches prctl(), capget()/capset() and seccomp().

`ALLOWED` is at once the documentation of every system call the confined
helper makes and the source of the filter. Each entry was found by
measurement (bench/measure_syscalls.py: strace over the conformance suite)
and names the function whose `#syscalls:` annotation lists it, or the
interpreter. Anything else kills the process (SECCOMP_RET_KILL_PROCESS).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

__all__ = [
    "ALLOWED",
    "ARCHES",
    "ConfinementError",
    "Filter",
    "Syscall",
    "allowed_names",
    "confine",
    "drop_for_connect",
    "lock_down",
    "native_arch",
    "seccomp_filter",
]


class ConfinementError(Exception):
    """The helper cannot confine itself as required: exit status 1; the text is the one-line message."""


# ---------------------------------------------------------------------------
# The allow-list


# Plain classes, not NamedTuple or dataclasses: importing typing would cost the helper ~10 ms at start-up.


class ArgEquals:
    """A system call argument must equal `value`; its low 32 bits are compared, all of an int argument."""

    __slots__ = ("arg", "value")

    def __init__(self, arg: int, value: int) -> None:
        self.arg = arg
        self.value = value


class Syscall:
    """One allowed system call: its numbers, who makes it and why, and conditions on its arguments."""

    __slots__ = ("aarch64", "name", "only", "where", "why", "x86_64")

    def __init__(
        self, name: str, x86_64: int, aarch64: int, where: str, why: str, only: tuple[ArgEquals, ...] = ()
    ) -> None:
        self.name = name
        self.x86_64 = x86_64
        self.aarch64 = aarch64
        #: "helper.<function>" or "cli.<function>" whose `#syscalls:` annotation names it, or "interpreter".
        self.where = where
        self.why = why
        self.only = only

    def number(self, arch: Arch) -> int:
        """The call's number on `arch`."""
        return self.x86_64 if arch.name == "x86_64" else self.aarch64


_SOL_TCP = 6
_TCP_REPAIR = 19
_PROT_READ = 1
_PROT_WRITE = 2

#: The system calls the helper makes once confined. Numbers: asm/unistd_64.h (x86_64) and
#: asm-generic/unistd.h (aarch64), checked against the headers by tests/test_hardening.py.
ALLOWED: tuple[Syscall, ...] = (
    Syscall("recvmsg", 47, 212, "helper.serve", "receive a request and its descriptors (socket.recvmsg_into)"),
    Syscall("sendto", 44, 206, "helper.serve", "send the one-byte reply (socket.send)"),
    Syscall(
        "getsockopt",
        55,
        209,
        "helper.switch",
        "read TCP_REPAIR before changing it, and to undo; socket(fileno=) reads SO_TYPE and SO_PROTOCOL",
    ),
    Syscall(
        "setsockopt",
        54,
        208,
        "helper.switch",
        "set TCP_REPAIR, and put it back on failure; no other option, at no other level",
        (ArgEquals(1, _SOL_TCP), ArgEquals(2, _TCP_REPAIR)),
    ),
    Syscall("getsockname", 51, 204, "helper._SocketTable.views", "socket(fileno=) reads the address family"),
    Syscall("close_range", 436, 436, "helper._close", "close a message's descriptors in one call"),
    Syscall("close", 3, 57, "helper._close", "close descriptors that are not contiguous; the connection at exit"),
    Syscall("newfstatat", 262, 79, "helper._apply", "find which descriptor is not a socket (os.fstat)"),
    Syscall("write", 1, 64, "helper.stderr_log", "the one-line error, and --debug lines"),
    Syscall("rt_sigreturn", 15, 139, "interpreter", "return from the SIGTERM/SIGINT handler"),
    Syscall("rt_sigaction", 13, 134, "interpreter", "finalization puts the signal handlers back"),
    Syscall("munmap", 11, 215, "interpreter", "the allocator gives memory back (at exit)"),
    Syscall("brk", 12, 214, "interpreter", "glibc malloc grows or trims its heap (seen: free() at exit)"),
    Syscall(
        "mmap",
        9,
        222,
        "interpreter",
        "the allocator maps a new arena or a large block; read-write only, never executable",
        (ArgEquals(2, _PROT_READ | _PROT_WRITE),),
    ),
    Syscall("exit_group", 231, 94, "interpreter", "exit"),
)


def allowed_names() -> set[str]:
    """The names of the allowed system calls."""
    return {s.name for s in ALLOWED}


# ---------------------------------------------------------------------------
# The filter: classic BPF over struct seccomp_data


class Arch:
    """An architecture the filter supports."""

    __slots__ = ("audit", "name", "seccomp_nr", "x32_bit")

    def __init__(self, name: str, audit: int, seccomp_nr: int, x32_bit: int | None) -> None:
        self.name = name
        #: AUDIT_ARCH_* (include/uapi/linux/audit.h): machine | 64-bit | little-endian.
        self.audit = audit
        #: seccomp()'s own number, to install the filter.
        self.seccomp_nr = seccomp_nr
        #: x86_64 also accepts x32 system calls: the same arch word, numbers with bit 30 set.
        self.x32_bit = x32_bit


ARCHES = {
    "x86_64": Arch("x86_64", 0xC000003E, 317, 0x40000000),
    "aarch64": Arch("aarch64", 0xC00000B7, 277, None),
}

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6] (little-endian).
_NR = 0
_ARCH = 4


def _arg_low(i: int) -> int:
    return 16 + 8 * i


_LD = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
INSTRUCTION = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k


def assemble(arch: Arch, allowed: tuple[Syscall, ...] = ALLOWED) -> bytes:
    """The seccomp program for `arch`: an array of struct sock_filter.

    Wrong architecture word, an x32 number, any call not allowed, or an allowed
    call whose arguments fail its tests: kill. Plain entries come first, each a
    single comparison; entries with argument tests follow, because their tests
    replace the number in the accumulator.
    """
    code: list[tuple[int, int | str, int | str, int]] = []  # a jump: 0 (next instruction) or a label
    labels: dict[str, int] = {}
    code += [(_LD, 0, 0, _ARCH), (_JEQ, 0, "kill", arch.audit), (_LD, 0, 0, _NR)]
    if arch.x32_bit is not None:
        code.append((_JGE, "kill", 0, arch.x32_bit))
    plain = [s for s in allowed if not s.only]
    tested = [s for s in allowed if s.only]
    for s in plain:
        code.append((_JEQ, "allow", 0, s.number(arch)))
    for s in tested:
        code.append((_JEQ, 0, f"after {s.name}", s.number(arch)))
        for i, test in enumerate(s.only):
            last = i == len(s.only) - 1
            passed: int | str = "allow" if last else 0
            code += [(_LD, 0, 0, _arg_low(test.arg)), (_JEQ, passed, "kill", test.value)]
        labels[f"after {s.name}"] = len(code)
    labels["kill"] = len(code)
    code.append((_RET, 0, 0, SECCOMP_RET_KILL_PROCESS))
    labels["allow"] = len(code)
    code.append((_RET, 0, 0, SECCOMP_RET_ALLOW))

    def offset(at: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        jump = labels[target] - at - 1
        if not 0 <= jump <= 255:
            raise ValueError(f"jump to {target} too far ({jump})")
        return jump

    return b"".join(INSTRUCTION.pack(op, offset(i, jt), offset(i, jf), k) for i, (op, jt, jf, k) in enumerate(code))


def native_arch() -> Arch | None:
    """The filter's architecture for this process, or None if unsupported (also for a 32-bit userland)."""
    arch = ARCHES.get(os.uname().machine)
    return arch if arch is not None and struct.calcsize("P") == 8 else None


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Filter:
    """A seccomp program assembled for one architecture, ready to install."""

    def __init__(self, arch: Arch) -> None:
        self.arch = arch
        self.program = assemble(arch)
        self._buffer = ctypes.create_string_buffer(self.program, len(self.program))
        self._fprog = _SockFprog(len(self.program) // INSTRUCTION.size, ctypes.addressof(self._buffer))

    def install(self) -> None:
        """Install the filter on every thread of the process. Needs no_new_privs (or CAP_SYS_ADMIN)."""
        result = _libc.syscall(
            ctypes.c_long(self.arch.seccomp_nr),
            ctypes.c_long(_SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(_SECCOMP_FILTER_FLAG_TSYNC),
            ctypes.byref(self._fprog),
        )
        if result < 0:
            raise ConfinementError(_failed("seccomp(SECCOMP_SET_MODE_FILTER)", ctypes.get_errno()))
        if result > 0:  # TSYNC: the id of a thread that could not take the filter
            raise ConfinementError(f"seccomp(SECCOMP_SET_MODE_FILTER): thread {result} could not take the filter")


def seccomp_filter(allow_unconfined: bool) -> Filter | None:
    """The filter for this machine; None (go on unconfined) only if there is none and that is allowed."""
    arch = native_arch()
    if arch is not None and _prctl_raw(_PR_GET_SECCOMP) >= 0:
        return Filter(arch)
    if allow_unconfined:
        return None
    if arch is None:
        what = f"this architecture ({os.uname().machine}, {struct.calcsize('P') * 8}-bit)"
    else:
        what = "this kernel (no seccomp)"
    supported = ", ".join(ARCHES)
    raise ConfinementError(f"no seccomp filter for {what}; supported: {supported}; --allow-unconfined runs without one")


# ---------------------------------------------------------------------------
# prctl() and capabilities

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int

_PR_SET_DUMPABLE = 4
_PR_GET_SECCOMP = 21
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_GET_SECUREBITS = 27
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

CAP_DAC_OVERRIDE = 1
CAP_SETPCAP = 8
CAP_NET_ADMIN = 12

# include/uapi/linux/securebits.h: uid 0 confers no capability, setuid() keeps them as they are,
# nothing can raise an ambient capability, and none of it can be undone.
_SECBIT_NOROOT = 1 << 0
_SECBIT_NOROOT_LOCKED = 1 << 1
_SECBIT_NO_SETUID_FIXUP = 1 << 2
_SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
_SECBIT_KEEP_CAPS = 1 << 4
_SECBIT_KEEP_CAPS_LOCKED = 1 << 5
_SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
_SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
_SECUREBITS = (
    _SECBIT_NOROOT
    | _SECBIT_NOROOT_LOCKED
    | _SECBIT_NO_SETUID_FIXUP
    | _SECBIT_NO_SETUID_FIXUP_LOCKED
    | _SECBIT_NO_CAP_AMBIENT_RAISE
    | _SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)


def _failed(what: str, err: int) -> str:
    name = errno.errorcode.get(err, f"errno {err}")
    return f"{what}: {name} ({os.strerror(err)})"


def _prctl_raw(option: int, *args: int) -> int:
    values = [ctypes.c_ulong(a) for a in (*args, 0, 0, 0, 0)[:4]]
    return int(_libc.prctl(ctypes.c_int(option), *values))


def _prctl(what: str, option: int, *args: int) -> int:
    result = _prctl_raw(option, *args)
    if result < 0:
        raise ConfinementError(_failed(f"prctl({what})", ctypes.get_errno()))
    return result


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _capget() -> tuple[int, int, int]:
    """The effective, permitted and inheritable sets, as bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise ConfinementError(_failed("capget", ctypes.get_errno()))

    def joined(field: str) -> int:
        return int(getattr(data[0], field)) | int(getattr(data[1], field)) << 32

    return joined("effective"), joined("permitted"), joined("inheritable")


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise ConfinementError(_failed("capset", ctypes.get_errno()))


def _bit(cap: int) -> int:
    return 1 << cap


def lock_down() -> None:
    """Not dumpable (no core file, no ptrace or /proc/PID/mem by the same uid) and no new privileges."""
    _prctl("PR_SET_DUMPABLE", _PR_SET_DUMPABLE, 0)
    _prctl("PR_SET_NO_NEW_PRIVS", _PR_SET_NO_NEW_PRIVS, 1)


def drop_for_connect() -> None:
    """Give up every capability but CAP_NET_ADMIN, and CAP_DAC_OVERRIDE until `confine()`.

    With CAP_SETPCAP (started as root): lock the securebits so that uid 0 confers
    nothing on execve, and empty the bounding set but for CAP_NET_ADMIN. Without
    it those stay as the caller set them (no_new_privs and the filter forbid
    execve anyway). Always: ambient and inheritable sets emptied.
    """
    effective, permitted, _ = _capget()
    if effective & _bit(CAP_SETPCAP):
        bits = _prctl("PR_GET_SECUREBITS", _PR_GET_SECUREBITS)
        wanted = bits | _SECUREBITS
        if not bits & _SECBIT_KEEP_CAPS_LOCKED:
            wanted = (wanted & ~_SECBIT_KEEP_CAPS) | _SECBIT_KEEP_CAPS_LOCKED
        if wanted != bits:
            _prctl("PR_SET_SECUREBITS", _PR_SET_SECUREBITS, wanted)
        cap = 0
        while (held := _prctl_raw(_PR_CAPBSET_READ, cap)) >= 0:  # EINVAL past the kernel's last capability
            if held and cap != CAP_NET_ADMIN:
                _prctl(f"PR_CAPBSET_DROP, {cap}", _PR_CAPBSET_DROP, cap)
            cap += 1
    _prctl("PR_CAP_AMBIENT_CLEAR_ALL", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    keep = _bit(CAP_NET_ADMIN) | (permitted & _bit(CAP_DAC_OVERRIDE))
    _capset(keep, keep, 0)


def confine(seccomp: Filter | None) -> None:
    """Keep CAP_NET_ADMIN alone, then install the filter (if any). Call once connected, before serving."""
    net_admin = _bit(CAP_NET_ADMIN)
    _capset(net_admin, net_admin, 0)
    if seccomp is not None:
        seccomp.install()
