"""The errors fusec raises on purpose; each message says what was expected and what was given."""


class FusecError(Exception):
    """Base of every error fusec raises on purpose."""


class IRError(FusecError):
    """A graph breaks an IR invariant (raised by the builder, the verifier and the pass runner)."""


class TakeIndexError(FusecError, IndexError):
    """A `take` index outside [0, n) of the gathered axis (raised by every backend and by the input guards)."""


class UnsupportedOpError(FusecError):
    """An ATen op (or an input kind) that fusec cannot lower, with where it came from in the user's code."""

    def __init__(self, op: str, origin: str = "", detail: str = ""):
        self.op, self.origin = op, origin
        msg = f"fusec does not support the op {op}"
        if detail:
            msg += f" ({detail})"
        if origin:
            msg += f", used at {origin}"
        super().__init__(msg)
