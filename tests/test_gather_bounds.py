"""Gather indices computed inside a fused kernel (`ids + 5`) are range-checked where they are computed:
an index out of range is an IndexError naming the gather and its bound, as in eager, never a read past
the table. Negative indices follow eager: x[i] counts from the end, embedding/index_select raise."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusec

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")
BACKENDS = ("numba", "reference")


class ShiftedEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, ids):
        return self.emb(ids + 5)


class Indexed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(40.0).reshape(10, 4))

    def forward(self, ids):
        return self.table[ids] * 2


class Selected(Indexed):
    def forward(self, ids):
        return self.table.index_select(0, ids) * 2


@pytest.fixture(scope="module")
def compiled_for():
    """compiled_for(module class, backend, example ids): one program per triple, made as the tests below make
    their eager module (seed 0), shared by their cases: a call that raised must leave nothing behind for
    the next anyway."""
    programs = {}

    def get(module, backend, ids):
        key = (module, backend, tuple(ids.shape))
        if key not in programs:
            torch.manual_seed(0)
            programs[key] = fusec.compile(module().eval(), (ids,), backend=backend)
        return programs[key]
    return get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [5, -6])
def test_computed_embedding_index_out_of_range_raises(backend, bad, compiled_for):
    torch.manual_seed(0)
    m = ShiftedEmbedding().eval()
    ids = torch.tensor([[0, 1, 2, 4]])
    c = compiled_for(ShiftedEmbedding, backend, ids)
    torch.testing.assert_close(c(ids), m(ids))
    good = ids.clone()
    ids[0, 2] = bad
    with pytest.raises(IndexError, match=r"index (10|-1) is out of range .*\[0, 10\)"):
        c(ids)
    torch.testing.assert_close(c(good), m(good))  # the error is not remembered by the next call


def test_computed_index_far_out_of_range_is_an_index_error_not_a_crash():
    code = """
import torch, fusec
from tests.test_gather_bounds import ShiftedEmbedding
m = ShiftedEmbedding().eval()
ids = torch.tensor([[0, 1, 2, 4]])
c = fusec.compile(m, (ids,))
ids[0, 2] = 10**9
try:
    c(ids)
except IndexError as e:
    print("IndexError:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IndexError: index 1000000005 is out of range" in r.stdout and "[0, 10)" in r.stdout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module", [Indexed, Selected])
@pytest.mark.parametrize("bad", [9, -1, -10, -11, 10])
def test_negative_indices_follow_eager(backend, module, bad, compiled_for):
    m = module()
    ids = torch.tensor([0, 1, 2, 4])
    c = compiled_for(module, backend, ids)
    ids[2] = bad
    try:
        want = m(ids)
    except IndexError:
        with pytest.raises(IndexError):
            c(ids)
        return
    assert torch.equal(c(ids), want)


def test_checked_gather_keeps_its_parallel_loop():
    m = ShiftedEmbedding().eval()
    ids = torch.zeros(64, 512, dtype=torch.int64)
    c = fusec.compile(m, (ids,))
    assert "checked_index(" in c.source and "prange(" in c.source
    torch.testing.assert_close(c(ids), m(ids))
