# SPDX-License-Identifier: GPL-2.0-or-later
"""Run a command under the seccomp rules of passt-repair@.service, for hosts where systemd is not PID 1.

    python systemd_sandbox.py COMMAND [ARGS...]

Installs a filter with what systemd 252 loads for MemoryDenyWriteExecute=yes
(mmap writable and executable, mprotect/pkey_mprotect to executable, shmat
with SHM_EXEC: EPERM), RestrictAddressFamilies=AF_UNIX (socket() of any other
family: EAFNOSUPPORT) and SystemCallArchitectures=native (EPERM), then
executes COMMAND. The unit's other settings are set up by the caller
(capabilities with setpriv, namespaces and read-only mounts with unshare).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALLS = {
    "x86_64": {"mmap": 9, "mprotect": 10, "shmat": 30, "socket": 41, "socketpair": 53, "pkey_mprotect": 329},
    "aarch64": {"shmat": 196, "socket": 198, "socketpair": 199, "mmap": 222, "mprotect": 226, "pkey_mprotect": 288},
}
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000

_LD_ABS, _JEQ, _JSET, _AND, _RET = 0x20, 0x15, 0x45, 0x54, 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_NR, _ARCH = 0, 4


def _arg(i: int) -> int:
    """Offset of the low 32 bits of argument i in struct seccomp_data (little-endian)."""
    return 16 + 8 * i


def program(machine: str) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k), with jumps resolved from labels."""
    nr = SYSCALLS[machine]
    code: list[tuple[int | str, object, object, int]] = [
        (_LD_ABS, 0, 0, _ARCH),
        (_JEQ, 0, "eperm", AUDIT_ARCH[machine]),
        (_LD_ABS, 0, 0, _NR),
        (_JEQ, "mmap", 0, nr["mmap"]),
        (_JEQ, "exec", 0, nr["mprotect"]),
        (_JEQ, "exec", 0, nr["pkey_mprotect"]),
        (_JEQ, "shm", 0, nr["shmat"]),
        (_JEQ, "family", 0, nr["socket"]),
        (_JEQ, "family", 0, nr["socketpair"]),
        (_RET, 0, 0, _ALLOW),
        ("mmap", 0, 0, 0),
        (_LD_ABS, 0, 0, _arg(2)),
        (_AND, 0, 0, PROT_WRITE | PROT_EXEC),
        (_JEQ, "eperm", "allow", PROT_WRITE | PROT_EXEC),
        ("exec", 0, 0, 0),
        (_LD_ABS, 0, 0, _arg(2)),
        (_JSET, "eperm", "allow", PROT_EXEC),
        ("shm", 0, 0, 0),
        (_LD_ABS, 0, 0, _arg(2)),
        (_JSET, "eperm", "allow", SHM_EXEC),
        ("family", 0, 0, 0),
        (_LD_ABS, 0, 0, _arg(0)),
        (_JEQ, "allow", 0, 1),  # AF_UNIX
        (_RET, 0, 0, _ERRNO | errno.EAFNOSUPPORT),
        ("eperm", 0, 0, 0),
        (_RET, 0, 0, _ERRNO | errno.EPERM),
        ("allow", 0, 0, 0),
        (_RET, 0, 0, _ALLOW),
    ]
    labels: dict[object, int] = {}
    real: list[tuple[int, object, object, int]] = []
    for op, jt, jf, k in code:
        if isinstance(op, str):
            labels[op] = len(real)
        else:
            real.append((op, jt, jf, k))

    def jump(target: object, at: int) -> int:
        return target if isinstance(target, int) else labels[target] - at - 1

    return [(op, jump(jt, i), jump(jf, i), k) for i, (op, jt, jf, k) in enumerate(real)]


def install(machine: str) -> None:
    raw = b"".join(struct.pack("HBBI", *insn) for insn in program(machine))
    filters = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HxxxxxxP", len(raw) // 8, ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.c_char_p(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    install(platform.machine())
    os.execvp(sys.argv[1], sys.argv[1:])  # noqa: S606
