"""Mapping between fusec dtype names ('f32', 'i64', ...) and NumPy / PyTorch dtypes.

NumPy has no bfloat16, so on the NumPy side a `bf16` value is stored as float32 whose values are rounded
to bfloat16 precision (`round_bf16`).
"""
from __future__ import annotations

import numpy as np
import torch

from fusec.errors import FusecError

_NUMPY: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32), "f64": np.dtype(np.float64), "f16": np.dtype(np.float16),
    "bf16": np.dtype(np.float32),  # stored as float32, rounded to bf16 precision
    "i64": np.dtype(np.int64), "i32": np.dtype(np.int32), "i16": np.dtype(np.int16),
    "i8": np.dtype(np.int8), "u8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
}
_FROM_NUMPY: dict[np.dtype, str] = {v: k for k, v in _NUMPY.items() if k != "bf16"}

_TORCH_NAMES = {
    "f32": "float32", "f64": "float64", "f16": "float16", "bf16": "bfloat16", "i64": "int64",
    "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8", "bool": "bool",
}


def to_numpy(dtype: str) -> np.dtype:
    """The NumPy dtype that holds values of `dtype` ('bf16' -> float32, see the module docstring)."""
    try:
        return _NUMPY[dtype]
    except KeyError:
        raise FusecError(f"unknown dtype {dtype!r}; expected one of {', '.join(_NUMPY)}") from None


def from_numpy(dtype: np.dtype | type) -> str:
    """The fusec name of a NumPy dtype (float32 -> 'f32'; never 'bf16')."""
    try:
        return _FROM_NUMPY[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise FusecError(f"NumPy dtype {dtype} has no fusec equivalent") from None


def to_torch(dtype: str) -> torch.dtype:
    if dtype not in _TORCH_NAMES:
        raise FusecError(f"unknown dtype {dtype!r}; expected one of {', '.join(_TORCH_NAMES)}")
    return getattr(torch, _TORCH_NAMES[dtype])


def from_torch(dtype: torch.dtype) -> str:
    for name, torch_name in _TORCH_NAMES.items():
        if getattr(torch, torch_name) == dtype:
            return name
    raise FusecError(f"torch dtype {dtype} is not supported by fusec; expected one of "
                     f"{', '.join(_TORCH_NAMES.values())}")


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32; NaN stays NaN."""
    shape = np.shape(x)  # ascontiguousarray makes a 0-d array 1-d
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(shape)
    bits = x.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, rounds to nearest with ties to even.
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF).astype(np.uint32)) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(x), x, rounded.view(np.float32))
