"""passt-repair: set and clear TCP_REPAIR for an unprivileged server, and use it.

The privileged helper is the `passt-repair` command (`passt_repair.cli`).
The server side of its protocol is `passt_repair.server`; the pure protocol
is `passt_repair.protocol`. Importing this package imports nothing else, so
the helper starts fast.
"""

__version__ = "0.1.0"
