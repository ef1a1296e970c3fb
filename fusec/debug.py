"""The one debug knob: `FUSEC_DEBUG=N` in the environment.

1: each pass with its time and node count; 2: also the IR after each pass; 3: also generated code.
`FUSEC_DEBUG_DIR=path` writes every compile's stages, generated source and a JSON summary to files
(`DebugDump`). The variables are read on every call, so a test or a long session can change them.
Long compiles show a progress line in interactive terminals (`Progress`).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time

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


# --- FUSEC_DEBUG_DIR: every stage of every compile, written to files ----------------------------------

_dumps = itertools.count()


def debug_dir() -> str | None:
    """The value of FUSEC_DEBUG_DIR (None when unset or empty)."""
    return os.environ.get("FUSEC_DEBUG_DIR", "").strip() or None


class DebugDump:
    """One compile's files under FUSEC_DEBUG_DIR/<name>-<pid>-<n>/: `00-ir.txt` (the traced IR), one
    `NN-<pass>.txt` per pass, `fx.txt` (torch's graph), `numba.py` (the generated source) and
    `summary.json` (inputs, options, passes with times and node counts, kernels, torch fallbacks, stats)."""

    def __init__(self, root: str, name: str):
        self.path = os.path.join(root, f"{name}-{os.getpid()}-{next(_dumps):03d}")
        os.makedirs(self.path, exist_ok=True)
        self.passes: list[dict] = []
        self._step = 0
        self._last = time.perf_counter()

    @classmethod
    def start(cls, name: str) -> DebugDump | None:
        root = debug_dir()
        return cls(root, name) if root else None

    def write(self, filename: str, text: str) -> None:
        with open(os.path.join(self.path, filename), "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def traced(self, graph, fx_code: str = "") -> None:
        """The traced IR (and torch's fx graph), before any pass."""
        self.write("00-ir.txt", repr(graph))
        if fx_code:
            self.write("fx.txt", fx_code)
        self._last = time.perf_counter()

    def stage(self, name: str, graph) -> None:
        """A pipeline callback: the IR after pass `name` (and the time since the previous one)."""
        self._step += 1
        ms = round((time.perf_counter() - self._last) * 1e3, 3)
        self.passes.append({"pass": name, "ms": ms, "nodes": len(graph.nodes)})
        self.write(f"{self._step:02d}-{name}.txt", repr(graph))
        self._last = time.perf_counter()

    def summary(self, data: dict) -> None:
        self.write("summary.json", json.dumps({**data, "passes": self.passes}, indent=1, default=str))


# --- a progress line on long compiles, in interactive terminals only -----------------------------------

PROGRESS_MIN_STEPS = 8  # fewer kernels compile too fast to need one


class Progress:
    """`[fusec] compiling <name>: kernel 3/40` on one rewritten stderr line, when stderr is a terminal,
    there are at least PROGRESS_MIN_STEPS steps and FUSEC_DEBUG is off (its lines would interleave)."""

    def __init__(self, name: str, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.name, self.total, self.done = name, total, 0
        self.enabled = total >= PROGRESS_MIN_STEPS and debug_level() == 0 and _isatty(self.stream)

    def step(self, what: str = "") -> None:
        self.done += 1
        if self.enabled:
            self.stream.write(f"\r[fusec] compiling {self.name}: kernel {self.done}/{self.total} {what:<12}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 72 + "\r")
            self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
