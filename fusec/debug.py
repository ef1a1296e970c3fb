"""The one debug knob: `FUSEC_DEBUG=N` in the environment.

1: each pass with its time and node count; 2: also the IR after each pass; 3: also generated code.
The variable is read on every call (`debug_level`), so a test or a long session can change it.
"""
from __future__ import annotations

import os
import sys

from fusec.errors import FusecError


def debug_level() -> int:
    """The current value of FUSEC_DEBUG (0 when unset or empty)."""
    text = os.environ.get("FUSEC_DEBUG", "").strip() or "0"
    try:
        return int(text)
    except ValueError:
        raise FusecError(f"FUSEC_DEBUG must be an integer level (0-3), got {text!r}") from None


def debug(level: int, msg: str) -> None:
    """Print `msg` to stderr when FUSEC_DEBUG is at least `level`."""
    if debug_level() >= level:
        print(msg, file=sys.stderr)


def __getattr__(name: str) -> int:
    # `fusec.debug.DEBUG` reads the live level, so no module holds a stale copy of the knob.
    if name == "DEBUG":
        return debug_level()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
