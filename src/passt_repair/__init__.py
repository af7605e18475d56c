# SPDX-License-Identifier: GPL-2.0-or-later
"""passt-repair: set and clear TCP_REPAIR for an unprivileged server, and use it.

The privileged helper is the `passt-repair` command (`passt_repair.cli`).
The server side of its protocol is `RepairServer` (blocking) and
`AsyncRepairServer` (asyncio); the pure protocol is `passt_repair.protocol`.

The public names below are loaded on first use (PEP 562), so importing the
package imports nothing else and the helper starts fast.
"""

__version__ = "0.1.0"

__all__ = [
    "SCM_MAX_FD",
    "AsyncRepairServer",
    "Command",
    "HelperGoneError",
    "HelperInfo",
    "NoHelperError",
    "ProtocolError",
    "RepairError",
    "RepairServer",
    "RepairTimeoutError",
    "SocketLike",
    "WrongReplyError",
    "__version__",
    "repair_state",
]

# Each public name and the module that defines it.
_ORIGIN = {
    "SCM_MAX_FD": "protocol",
    "Command": "protocol",
    "ProtocolError": "protocol",
    "AsyncRepairServer": "aio",
    "HelperGoneError": "server",
    "HelperInfo": "server",
    "NoHelperError": "server",
    "RepairError": "server",
    "RepairServer": "server",
    "RepairTimeoutError": "server",
    "SocketLike": "server",
    "WrongReplyError": "server",
    "repair_state": "server",
}

# Type checkers treat any name TYPE_CHECKING as true; importing typing would cost the helper 15 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .aio import AsyncRepairServer as AsyncRepairServer
    from .protocol import SCM_MAX_FD as SCM_MAX_FD
    from .protocol import Command as Command
    from .protocol import ProtocolError as ProtocolError
    from .server import HelperGoneError as HelperGoneError
    from .server import HelperInfo as HelperInfo
    from .server import NoHelperError as NoHelperError
    from .server import RepairError as RepairError
    from .server import RepairServer as RepairServer
    from .server import RepairTimeoutError as RepairTimeoutError
    from .server import SocketLike as SocketLike
    from .server import WrongReplyError as WrongReplyError
    from .server import repair_state as repair_state


if not TYPE_CHECKING:  # hidden from type checkers, so that a misspelt name is an error there too

    def __getattr__(name: str) -> object:
        module = _ORIGIN.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
