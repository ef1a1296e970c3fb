"""Range algebra (passes/ranges.py): position bookkeeping computed from `arange` of a symbolic length
folds as a static graph's does, so the cumsum and advanced index Hugging Face's mask builder runs over it
need no PyTorch call; positions that are data keep their torch ops and stay right."""
from __future__ import annotations

import pytest
import torch

import fusec


class PackedSequences(torch.nn.Module):
    """transformers' find_packed_sequence_indices and its use in the mask, over `positions` (None: arange)."""

    def forward(self, x, positions=None):
        if positions is None:
            positions = torch.arange(x.shape[1]).unsqueeze(0)
        first = positions[:, :1] - 1
        sequence = (torch.diff(positions, prepend=first, dim=-1) != 1).cumsum(-1)
        b, q = torch.zeros(1, 1, dtype=torch.long), torch.arange(x.shape[1])
        same = sequence[b, q][:, :, None] == sequence[b, q][:, None, :]
        return x.sum(-1, keepdim=True) * same.to(x.dtype)


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_positions_from_a_symbolic_arange_fold_and_run_no_torch_op(backend):
    module = PackedSequences()
    compiled = fusec.compile(module, (torch.randn(1, 6, 4),), dynamic={"x": {1: (1, 32)}}, backend=backend)
    assert compiled.stats["torch_ops"] == 0
    for t in (1, 2, 3, 11, 32):
        x = torch.randn(1, t, 4, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(compiled(x), module(x), msg=f"at size {t}")
    assert compiled.stats["programs"] == 1


def test_positions_given_as_data_keep_their_torch_ops_and_stay_right():
    module = PackedSequences()
    packed = torch.tensor([[0, 1, 2, 0, 1, 0]])  # three sequences packed in one row: not a range
    compiled = fusec.compile(module, (torch.randn(1, 6, 4), packed), backend="reference")
    assert compiled.stats["torch_ops"] >= 1  # cumsum over data
    x = torch.randn(1, 6, 4)
    for positions in (packed, torch.tensor([[0, 1, 2, 3, 4, 5]]), torch.tensor([[5, 6, 0, 1, 2, 9]])):
        torch.testing.assert_close(compiled(x, positions), module(x, positions))
