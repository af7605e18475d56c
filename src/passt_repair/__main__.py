"""`python -m passt_repair`: the same as the passt-repair command."""

import sys

from .cli import main

sys.exit(main())
