# SPDX-License-Identifier: GPL-2.0-or-later
"""EXPERIMENT, not a helper: the least a Python program can do in directory mode, for the floor.

Run as `python -I -S directory_floor.py DIRECTORY`: watches DIRECTORY with
inotify (IN_CREATE), blocks in read() on the watch, and connects to the
first new name ending in .repair, retrying after ECONNREFUSED with the
shipped helper's back-off; then waits for the server to close. Everything
that runs between the wake-up and connect() is kept to a few calls already
made once before the wait: that is the part the benchmark times.
"""

import ctypes
import os
import sys
import time
from _socket import AF_UNIX, SOCK_STREAM, socket

IN_CLOEXEC = 0o2000000
IN_CREATE = 0x100
EVENT_HEADER = 16  # wd, mask, cookie, len

directory = os.fsencode(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
watch = libc.inotify_init1(IN_CLOEXEC)
if watch < 0 or libc.inotify_add_watch(watch, directory, IN_CREATE) < 0:
    sys.exit(f"inotify: {os.strerror(ctypes.get_errno())}")
conn = socket(AF_UNIX, SOCK_STREAM)
path = b""
while not path:
    data = os.read(watch, 4096)
    offset = 0
    while offset < len(data):
        length = int.from_bytes(data[offset + 12 : offset + 16], sys.byteorder)
        name = data[offset + EVENT_HEADER : offset + EVENT_HEADER + length].rstrip(b"\0")
        offset += EVENT_HEADER + length
        if name.endswith(b".repair"):
            path = directory + b"/" + name
            break
delay = 50e-6
while True:
    try:
        conn.connect(path)
        break
    except ConnectionRefusedError:
        time.sleep(delay)
        delay = min(delay * 2, 10e-3)
os.close(watch)
conn.recv(1)
