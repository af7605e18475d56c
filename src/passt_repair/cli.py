"""Command line of the passt-repair helper: arguments in, exit status out.

Exit status: 0 when the server closes the connection (end of file or reset)
or SIGTERM/SIGINT stops the helper, 1 on any error, 2 on a usage error.
Every error is one line on stderr; no traceback reaches the user.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import __version__

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

USAGE = "usage: passt-repair [--debug] PATH"
HELP = f"""{USAGE}

Privileged helper that sets and clears TCP_REPAIR on sockets for an
unprivileged server (passt), as asked over the UNIX domain socket PATH.

PATH is the server's repair socket (passt: its socket path + ".repair", or
--repair-path). If PATH is a directory, wait for a socket whose name ends
in ".repair" to appear in it (or use one already there), then connect.

Needs CAP_NET_ADMIN (or root).

options:
  --debug     log each request (command, number of sockets, time taken)
  --help      show this help and exit
  --version   show the version and exit

exit status: 0 when the server closes the connection, or on SIGTERM/SIGINT;
1 on error; 2 on usage error."""


class Options:
    """Parsed command line."""

    __slots__ = ("debug", "path")

    def __init__(self, path: str, debug: bool) -> None:
        self.path = path
        self.debug = debug


class _Usage(Exception):
    pass


def parse(argv: Sequence[str]) -> Options:
    """Parse arguments (without the program name); raise _Usage with the message."""
    debug = False
    paths: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            paths.extend(args)
        elif arg == "--debug":
            debug = True
        elif arg.startswith("-") and arg != "-":
            raise _Usage(f"unknown option {arg}")
        else:
            paths.append(arg)
    if len(paths) != 1:
        raise _Usage("expected exactly one PATH" if paths else "missing PATH")
    return Options(paths[0], debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the helper; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(HELP)
        return EXIT_OK
    if "--version" in args:
        print(f"passt-repair {__version__}")
        return EXIT_OK
    from .helper import HelperError, UsageError, run, stderr_log

    try:
        options = parse(args)
    except _Usage as e:
        stderr_log(f"{e} ({USAGE})")
        return EXIT_USAGE
    try:
        run(options.path, stderr_log, stderr_log if options.debug else None)
    except UsageError as e:
        stderr_log(f"{e}")
        return EXIT_USAGE
    except HelperError as e:
        stderr_log(f"error: {e}")
        return EXIT_ERROR
    return EXIT_OK
