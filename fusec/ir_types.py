"""The IR's value types: dtype names and `TensorType` (shape and dtype of a value).

The bottom of the IR layer: the op set's type rules (`fusec.opset`) and the graph (`fusec.ir`) both build
on it, so it imports nothing of fusec but its errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusec.errors import IRError

DTYPES = ("f32", "f64", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "bool")
FLOAT_DTYPES = ("f32", "f64", "f16", "bf16")


@dataclass(frozen=True)
class TensorType:
    """Shape and element type of a value. A dimension is an int or a `fusec.symbolic.Sym`, a size known at
    run time (a polynomial in named size variables with bounds, e.g. the sequence length `s0`)."""

    shape: tuple[Any, ...]
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise IRError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"


def dtype_size(dtype: str) -> int:
    return {"f64": 8, "i64": 8, "f32": 4, "i32": 4, "f16": 2, "bf16": 2, "i16": 2}.get(dtype, 1)

