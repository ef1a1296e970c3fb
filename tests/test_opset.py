"""The op set's type rules: one per op, looked up in a table (`fusec.opset.RULES`)."""
from __future__ import annotations

import pytest

from fusec.errors import IRError
from fusec.ir_types import TensorType
from fusec.opset import OPS, RULES, infer


def test_every_op_has_a_type_rule_and_every_rule_an_op():
    assert set(RULES) == set(OPS)
    assert all(callable(rule) for rule in RULES.values())


def test_infer_looks_the_rule_up():
    x = TensorType((2, 3), "f32")
    assert infer("add", [x, TensorType((3,), "f32")], {}) == x
    assert infer("lt", [x, x], {}) == TensorType((2, 3), "bool")
    assert infer("sum", [x], {"axes": (1,)}) == TensorType((2,), "f32")
    assert infer("take", [x, TensorType((4,), "i64")], {"axis": 0}) == TensorType((4, 3), "f32")
    assert infer("kernel", [x], {}, declared=x) == x
    with pytest.raises(IRError, match="unknown op 'frobnicate'"):
        infer("frobnicate", [x], {})
    with pytest.raises(IRError, match="kernel: needs an explicit type"):
        infer("kernel", [x], {})
