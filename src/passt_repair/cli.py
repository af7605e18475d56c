"""Command line of the passt-repair helper: arguments in, exit status out.

Exit status: 0 when the server closes the connection (end of file or reset)
or SIGTERM/SIGINT stops the helper, 1 on any error, 2 on a usage error.
Every error is one line on stderr; no traceback reaches the user.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from . import __version__

TYPE_CHECKING = False  # typing costs the helper ~10 ms at start-up; mypy alone needs it
if TYPE_CHECKING:
    from typing import Literal

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

USAGE = "usage: passt-repair [--debug] [--peer-uid UID|owner] [--allow-unconfined] PATH"
HELP = f"""{USAGE}

Privileged helper that sets and clears TCP_REPAIR on sockets for an
unprivileged server (passt), as asked over the UNIX domain socket PATH.

PATH is the server's repair socket (passt: its socket path + ".repair", or
--repair-path). If PATH is a directory, wait for a socket whose name ends
in ".repair" to appear in it (or use one already there), then connect; a
".repair" entry that is a symbolic link is refused.

Needs CAP_NET_ADMIN (or root), and keeps nothing else: once connected it
holds CAP_NET_ADMIN alone, cannot gain privileges, is not dumpable, and a
seccomp filter kills it on any system call outside its short list.

options:
  --debug             log each request (command, number of sockets, time taken)
  --peer-uid UID      refuse a server that does not run as UID (SO_PEERCRED)
  --peer-uid owner    refuse a server that does not run as the owner of the
                      socket file
  --allow-unconfined  on an architecture (or kernel) the seccomp filter does
                      not support, go on without it instead of refusing to run
  --help              show this help and exit
  --version           show the version and exit

exit status: 0 when the server closes the connection, or on SIGTERM/SIGINT;
1 on error (a missing capability and a refused server included); 2 on usage
error."""

#: uid_t is 32 bits; (uid_t)-1 means "no uid" to the kernel.
_UID_MAX = 2**32 - 2


class Options:
    """Parsed command line."""

    __slots__ = ("allow_unconfined", "debug", "path", "peer_uid")

    def __init__(self, path: str, debug: bool, peer_uid: int | Literal["owner"] | None, allow_unconfined: bool) -> None:
        self.path = path
        self.debug = debug
        #: A uid, "owner", or None for any.
        self.peer_uid = peer_uid
        self.allow_unconfined = allow_unconfined


class _Usage(Exception):
    pass


def _peer_uid(value: str | None) -> int | Literal["owner"]:
    if value is None:
        raise _Usage("--peer-uid needs a UID or 'owner'")
    if value == "owner":
        return "owner"
    if not value.isascii() or not value.isdigit() or int(value) > _UID_MAX:
        raise _Usage(f"--peer-uid: not a UID or 'owner': {value!r}")
    return int(value)


def parse(argv: Sequence[str]) -> Options:
    """Parse arguments (without the program name); raise _Usage with the message."""
    debug = False
    allow_unconfined = False
    peer_uid: int | Literal["owner"] | None = None
    paths: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            paths.extend(args)
        elif arg == "--debug":
            debug = True
        elif arg == "--peer-uid":
            peer_uid = _peer_uid(next(args, None))
        elif arg == "--allow-unconfined":
            allow_unconfined = True
        elif arg.startswith("-") and arg != "-":
            raise _Usage(f"unknown option {arg}")
        else:
            paths.append(arg)
    if len(paths) != 1:
        raise _Usage("expected exactly one PATH" if paths else "missing PATH")
    return Options(paths[0], debug, peer_uid, allow_unconfined)


def _claim_standard_descriptors() -> None:
    """Put /dev/null on any of descriptors 0, 1, 2 the parent left closed.

    Otherwise the server connection could take number 2, and log lines would go to the server.
    """
    while (fd := os.open(os.devnull, os.O_RDWR)) <= 2:
        pass
    os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the helper; return the exit status."""
    _claim_standard_descriptors()
    from . import hardening
    from .helper import HelperError, UsageError, run, stderr_log

    try:
        hardening.lock_down()
    except hardening.ConfinementError as e:
        stderr_log(f"error: {e}")
        return EXIT_ERROR
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(HELP)
        return EXIT_OK
    if "--version" in args:
        print(f"passt-repair {__version__}")
        return EXIT_OK
    try:
        options = parse(args)
    except _Usage as e:
        stderr_log(f"{e} ({USAGE})")
        return EXIT_USAGE
    try:
        hardening.require_net_admin()
        seccomp = hardening.seccomp_filter(options.allow_unconfined)
        if seccomp is None:
            stderr_log("warning: no seccomp filter for this machine: going on without one (--allow-unconfined)")
        hardening.drop_for_connect()
        run(
            options.path,
            stderr_log,
            stderr_log if options.debug else None,
            peer_uid=options.peer_uid,
            confine=lambda: hardening.confine(seccomp),
        )
    except UsageError as e:
        stderr_log(f"{e}")
        return EXIT_USAGE
    except (HelperError, hardening.ConfinementError) as e:
        stderr_log(f"error: {e}")
        return EXIT_ERROR
    except Exception as e:  # under the filter a traceback would kill the helper: printing one opens source files
        stderr_log(f"error: internal error: {type(e).__name__}: {e}")
        return EXIT_ERROR
    return EXIT_OK
