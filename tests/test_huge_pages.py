"""Weights in one block of huge pages (`fusec.huge_pages`): copies keep values, dtypes and shapes; a module's
parameters moved there keep their identity and values, and eager, in-place updates and compiled programs
see the same memory; what must not move (shared memory, storage shared by two parameters) stays."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fusec
from fusec import huge_pages
from fusec.models.causal_lm import random_model
from fusec.models import LlamaConfig

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")  # tiny kernels


def test_pack_copies_tensors_one_after_another_in_a_block_on_a_huge_page_boundary():
    tensors = [torch.randn(5, 7), torch.arange(9, dtype=torch.int8), torch.randn(3).bfloat16(),
               torch.tensor([True, False])]
    copies = huge_pages.pack(tensors)
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous() and torch.equal(c, t)
        assert c.data_ptr() != t.data_ptr() and huge_pages.packed(c) and not huge_pages.packed(t)
    assert huge_pages.pack([torch.zeros(1 << 20)])[0].data_ptr() % huge_pages.HUGE_PAGE == 0  # (4 MB)
    starts = [c.data_ptr() for c in copies]
    assert starts == sorted(starts) and all(s % huge_pages.ALIGN == 0 for s in starts)
    assert huge_pages.pack([]) == []
    assert not huge_pages.zeros((3, 4)).any() and huge_pages.packed(huge_pages.zeros((2,)))


def test_parameters_moved_keep_identity_values_and_are_followed_by_a_compiled_program():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(3, 16)
    compiled = fusec.compile(module, (x,))  # compiled before the move: it follows the parameters
    params, want = list(module.parameters()), module(x)
    moved = huge_pages.pack_parameters(module)
    assert moved == sum(p.numel() * 4 for p in params) and list(module.parameters()) == params
    assert all(huge_pages.packed(p) for p in params) and huge_pages.pack_parameters(module) == 0
    torch.testing.assert_close(module(x), want, rtol=0, atol=0)
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        module[0].weight.mul_(2.0)  # in place: the block, which eager and the program both read
    torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)


def test_shared_memory_and_parameters_sharing_storage_stay_where_they_are():
    shared, tied_a = nn.Linear(4, 4), nn.Linear(4, 4)
    shared.share_memory()
    tied_b = nn.Linear(4, 4)
    tied_b.weight = nn.Parameter(tied_a.weight.data)  # two Parameters, one storage
    module = nn.ModuleList([shared, tied_a, tied_b])
    before = {name: p.data_ptr() for name, p in module.named_parameters()}
    huge_pages.pack_parameters(module)
    after = {name: p.data_ptr() for name, p in module.named_parameters()}
    kept = {"0.weight", "0.bias", "1.weight", "2.weight"}
    assert all(after[n] == before[n] for n in kept) and tied_a.weight.data_ptr() == tied_b.weight.data_ptr()
    assert all(huge_pages.packed(p) for n, p in module.named_parameters() if n not in kept)


def test_fault_in_writes_zeros_in_a_thread_and_the_generator_waits_for_it_before_writing():
    block = huge_pages.zeros((3, 1 << 18))
    block[1, 5] = 1.0  # (a write before the thread starts; after it starts, writes must wait for it)
    thread = huge_pages.fault_in([block])
    thread.join()
    assert not block.any()
    gen = fusec.compile_generator(random_model(LlamaConfig.preset("tiny")), backend="reference")
    assert list(gen._faulting) == [1]  # the decode program's example took its caches without waiting
    k, v = gen.caches(1)
    assert not gen._faulting and not k.any() and not v.any()


def test_the_generator_packs_its_model_unless_told_not_to():
    import dataclasses
    config = dataclasses.replace(LlamaConfig.preset("tiny"), vocab_size=64, max_seq_len=16)
    for pack in (True, False):
        model = random_model(config)
        ids = torch.tensor([1, 2, 3])
        want = fusec.generate.eager_generate(model, ids[None], 4)[0][0]
        gen = fusec.compile_generator(model, pack_weights=pack, backend="reference")
        gen.wait()  # (the copies are made in a thread; the first generate or `wait` moves the parameters)
        assert all(huge_pages.packed(p) for p in model.parameters()) == pack
        assert all(huge_pages.packed(c) for c in gen.caches(1))
        assert torch.equal(gen.generate(ids, max_new_tokens=4), want)


def test_the_parameters_move_between_decode_steps_and_the_program_follows_them():
    """The copy starts after a generation's first token (not beside the prompt) and the parameters move
    between two decode steps once it is made; the decode program reads them there from the next step."""
    import dataclasses
    config = dataclasses.replace(LlamaConfig.preset("tiny"), vocab_size=64, max_seq_len=16)
    model = random_model(config)
    ids = torch.tensor([1, 2, 3])
    want = fusec.generate.eager_generate(model, ids[None], 8)[0][0]
    gen = fusec.compile_generator(model, background=False, pack_weights=False)
    gen.to_pack = model  # (as `pack_weights=True` leaves it, after the programs compiled)
    seen = []  # per new token: (the copy not started yet, the parameters packed)

    def copy_made(n, token):  # after a first token the copy runs; let it finish before the next step
        seen.append((gen.to_pack is not None, all(huge_pages.packed(p) for p in model.parameters())))
        if gen.packing is not None:
            gen.packing.worker.join()
    assert torch.equal(gen.generate(ids, max_new_tokens=8, on_token=copy_made), want)
    assert seen[0] == (True, False) and seen[-1] == (False, True)  # moved between two decode steps
    assert gen.packing is None and gen.to_pack is None
    assert all(huge_pages.packed(p) for p in model.parameters())
    assert not gen.decode_program(1)._first.follow.changed()  # it reads the moved parameters


def test_a_parameter_changed_while_it_is_copied_keeps_its_change():
    """`Packing` copies in a thread: a parameter updated in place meanwhile is copied again when it is
    moved; one replaced meanwhile stays as replaced (not moved onto a stale copy)."""
    module = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    packing = huge_pages.Packing(module)
    with torch.no_grad():
        module[0].weight.add_(1.0)
    replaced = torch.randn(64, 64)
    module[1].weight.data = replaced
    want = [p.detach().clone() for p in module.parameters()]
    packing.finish()
    assert all(torch.equal(p, w) for p, w in zip(module.parameters(), want))
    assert huge_pages.packed(module[0].weight) and module[1].weight.data_ptr() == replaced.data_ptr()
