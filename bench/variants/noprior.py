"""EXPERIMENT, not the shipped helper: passt-repair without the prior-state read.

The installed command's main(), with `helper.switch` replaced by one that sets
TCP_REPAIR on each socket without reading its state first. A failure halfway
then cannot put the sockets back as they were, so this is not a candidate: it
only shows, side by side with the shipped helper, what the exact rollback
costs. Everything else (connect, hardening, the loop, errors) is shipped code.

Usage: PYTHON noprior.py PATH
"""

from __future__ import annotations

import sys
from _socket import socket
from collections.abc import Sequence

from passt_repair import cli, helper
from passt_repair.protocol import SOL_TCP, TCP_REPAIR


def switch_without_prior_read(views: Sequence[socket], value: int) -> None:
    """Set TCP_REPAIR on every socket; a failure raises SwitchError with nothing put back."""
    remaining = iter(views)
    try:
        for view in remaining:
            view.setsockopt(SOL_TCP, TCP_REPAIR, value)
    except OSError as e:
        raise helper.SwitchError(len(views) - sum(1 for _ in remaining) - 1, e, 0) from None


if __name__ == "__main__":
    helper.switch = switch_without_prior_read  # _apply() looks switch up at call time
    sys.exit(cli.main(sys.argv[1:]))
