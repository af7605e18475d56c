# SPDX-License-Identifier: GPL-2.0-or-later
"""Command line of the passt-repair helper: arguments in, exit status out.

Exit status: 0 when the server closes the connection (end of file or reset)
or SIGTERM/SIGINT stops the helper, 1 on any error, 2 on a usage error.
Every error is one line on stderr; no traceback reaches the user.
"""

from __future__ import annotations

import posix
import sys

from . import __version__
from .helper import (
    HelperError,
    Stopped,
    UsageError,
    check_start,
    install_signal_handlers,
    run,
    shown,
    stderr_log,
)

TYPE_CHECKING = False  # typing costs the helper ~10 ms at start-up; mypy alone needs it
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Literal, NoReturn

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

USAGE = "usage: passt-repair [--debug] [--peer-uid UID|owner] [--timeout SECONDS] [--allow-unconfined] [--] PATH"
HELP = f"""{USAGE}

Privileged helper that sets and clears TCP_REPAIR on sockets for an
unprivileged server (passt), as asked over the UNIX domain socket PATH.

PATH is the server's repair socket (passt: its socket path + ".repair", or
--repair-path). If PATH is a directory, wait for a socket whose name ends
in ".repair" to appear in it (or use one already there), then connect; a
".repair" entry that is a symbolic link is refused, and the directory
deleted or moved away ends the wait with an error.

Needs CAP_NET_ADMIN (or root). Once connected, and before it reads any
request, it keeps CAP_NET_ADMIN alone, cannot gain privileges, is not
dumpable, and a seccomp filter kills it on any system call outside its
short list.

options:
  --debug             log each request (command, number of sockets, time taken)
  --peer-uid UID      refuse a server that does not run as UID (SO_PEERCRED)
  --peer-uid owner    refuse a server that does not run as the owner of the
                      socket file (passt started as root binds as root, then
                      runs as nobody: give that uid instead)
  --timeout SECONDS   exit 1 if nothing is connected within SECONDS
  --allow-unconfined  on an architecture (or kernel) the seccomp filter does
                      not support, go on without it instead of refusing to run
  --help              show this help and exit
  --version           show the version and exit
  --                  end of options: what follows is PATH

exit status: 0 when the server closes the connection, or on SIGTERM/SIGINT;
1 on error (a missing capability and a refused server included); 2 on usage
error."""

#: uid_t is 32 bits; (uid_t)-1 means "no uid" to the kernel.
_UID_MAX = 2**32 - 2
#: --timeout: a year at most (setitimer() takes it; longer is a mistake).
_TIMEOUT_MAX = 365 * 86400


class Options:
    """Parsed command line; `action` is "run", "help" or "version"."""

    __slots__ = ("action", "allow_unconfined", "debug", "path", "peer_uid", "timeout")

    def __init__(
        self,
        path: str,
        debug: bool = False,
        peer_uid: int | Literal["owner"] | None = None,
        allow_unconfined: bool = False,
        timeout: float = 0.0,
        action: str = "run",
    ) -> None:
        self.path = path
        self.debug = debug
        #: A uid, "owner", or None for any.
        self.peer_uid = peer_uid
        self.allow_unconfined = allow_unconfined
        #: Seconds to wait for a connection; 0 for ever.
        self.timeout = timeout
        self.action = action


class _Usage(Exception):
    pass


def _peer_uid(value: str | None) -> int | Literal["owner"]:
    if value is None:
        raise _Usage("--peer-uid needs a UID or 'owner'")
    if value == "owner":
        return "owner"
    if not value.isascii() or not value.isdigit() or int(value) > _UID_MAX:
        raise _Usage(f"--peer-uid: not a UID or 'owner': {shown(value)}")
    return int(value)


def _timeout(value: str | None) -> float:
    if value is None:
        raise _Usage("--timeout needs a number of seconds")
    try:
        seconds = float(value) if value.isascii() else -1.0
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= _TIMEOUT_MAX:  # also refuses nan
        raise _Usage(f"--timeout: not a number of seconds above 0: {shown(value)}")
    return seconds


def parse(argv: Sequence[str]) -> Options:
    """Parse arguments (without the program name); raise _Usage with the message.

    --help and --version act where they stand; after "--" every argument is PATH.
    """
    debug = False
    allow_unconfined = False
    peer_uid: int | Literal["owner"] | None = None
    timeout = 0.0
    paths: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            paths.extend(args)
        elif arg in ("--help", "-h"):
            return Options("", action="help")
        elif arg == "--version":
            return Options("", action="version")
        elif arg == "--debug":
            debug = True
        elif arg == "--peer-uid":
            peer_uid = _peer_uid(next(args, None))
        elif arg == "--timeout":
            timeout = _timeout(next(args, None))
        elif arg == "--allow-unconfined":
            allow_unconfined = True
        elif arg.startswith("-") and arg != "-":
            raise _Usage(f"unknown option {shown(arg)}")
        else:
            paths.append(arg)
    if len(paths) != 1:
        raise _Usage("expected exactly one PATH" if paths else "missing PATH")
    if not paths[0]:
        raise _Usage("PATH is empty")
    return Options(paths[0], debug, peer_uid, allow_unconfined, timeout)


def _claim_standard_descriptors() -> None:
    """Put /dev/null on any of descriptors 0, 1, 2 the parent left closed.

    Otherwise the server connection could take number 2, and log lines would go to the server.
    """
    while (fd := posix.open("/dev/null", posix.O_RDWR)) <= 2:
        pass
    posix.close(fd)


def _print(text: str) -> int:
    """Write `text` and a newline to stdout; a reader that has gone is no error, any other failure is."""
    data = f"{text}\n".encode()
    try:
        while data:
            data = data[posix.write(1, data) :]
    except BrokenPipeError:
        return EXIT_OK  # `passt-repair --help | head -1`: the reader had what it wanted
    except OSError as e:
        stderr_log(f"error: write to standard output: {e.strerror}")
        return EXIT_ERROR
    return EXIT_OK


def _drop_to_wait() -> None:
    """Before waiting in a directory (for seconds or hours): not dumpable, no new privileges, and
    CAP_NET_ADMIN with CAP_DAC_OVERRIDE (to reach the socket) alone. Start-up speed no longer matters there."""
    from . import hardening

    try:
        hardening.lock_down()
        hardening.drop_for_connect()
    except hardening.ConfinementError as e:
        raise HelperError(str(e)) from None


def _confine(filtered: bool) -> None:
    """Once connected: not dumpable, no new privileges, CAP_NET_ADMIN alone, then the filter (if `filtered`).

    hardening (ctypes) is imported only now: the 3 ms it takes come after the server's accept().
    """
    from . import hardening

    try:
        hardening.lock_down()
        seccomp = hardening.seccomp_filter(allow_unconfined=False) if filtered else None
        hardening.drop_for_connect()
        hardening.confine(seccomp)
    except hardening.ConfinementError as e:
        raise HelperError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the helper; return the exit status."""
    install_signal_handlers()
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except Stopped:
        return EXIT_OK


def _main(args: list[str]) -> int:
    _claim_standard_descriptors()
    try:
        options = parse(args)
    except _Usage as e:
        stderr_log(f"{e} ({USAGE})")
        return EXIT_USAGE
    if options.action == "help":
        return _print(HELP)
    if options.action == "version":
        return _print(f"passt-repair {__version__}")
    try:
        filtered = check_start(options.allow_unconfined)
        if not filtered:
            stderr_log("warning: no seccomp filter for this machine: going on without one (--allow-unconfined)")
        run(
            options.path,
            stderr_log,
            stderr_log if options.debug else None,
            peer_uid=options.peer_uid,
            confine=lambda: _confine(filtered),
            before_waiting=_drop_to_wait,
            timeout=options.timeout,
        )
    except UsageError as e:
        stderr_log(f"{e}")
        return EXIT_USAGE
    except HelperError as e:
        stderr_log(f"error: {e}")
        return EXIT_ERROR
    except Stopped:
        return EXIT_OK
    except Exception as e:  # under the filter a traceback would kill the helper: printing one opens source files
        stderr_log(f"error: internal error: {type(e).__name__}: {e}")
        return EXIT_ERROR
    return EXIT_OK


def entry() -> NoReturn:
    """The passt-repair command: main(), then the end of the process at once.

    os._exit skips the interpreter's teardown (2 ms, and system calls the filter
    does not allow); everything the helper writes is unbuffered, so nothing is lost.
    """
    try:
        code = main()
    except Stopped:  # from a signal between main()'s own handlers
        code = EXIT_OK
    posix._exit(code)
