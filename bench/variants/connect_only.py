"""EXPERIMENT, not a helper: the least a Python program can do to connect, for the start-up floor.

Run as `python -I -S connect_only.py [--imports] PATH`: connects with the C
socket module, waits for the server to close, exits 0. With --imports it
first imports what the helper needs from the standard library if it used
the C modules _socket and _signal instead of socket and signal and had no
enum: the start-up such a helper could reach. The distance from these to the
installed command is what imports and wrappers cost.
"""

import sys

if sys.argv[1] == "--imports":
    import _signal  # type: ignore[import-not-found]  # noqa: F401
    import array  # noqa: F401
    import errno  # noqa: F401
    import os  # noqa: F401
    import select  # noqa: F401
    import stat  # noqa: F401
    import struct  # noqa: F401
    import time  # noqa: F401
from _socket import AF_UNIX, SOCK_STREAM, socket

conn = socket(AF_UNIX, SOCK_STREAM)
conn.connect(sys.argv[-1])
conn.recv(1)
