# SPDX-License-Identifier: GPL-2.0-or-later
"""`python -I -m passt_repair`: the same as the passt-repair command, which starts the interpreter so.

Without -I the interpreter has read PYTHON* variables, the user site and the
current directory before this runs, any of which can run code as this
privileged process: say so, since it can no longer be undone here.
"""

import sys

from .cli import entry
from .helper import stderr_log

if not sys.flags.isolated:
    stderr_log(
        "warning: not started isolated (python -I): PYTHON* variables, the user site and the current directory"
        " could have run code as this helper before it started; use the passt-repair command"
    )
entry()
