"""Weights on huge pages: one block of memory in 2 MiB pages, the tensors in it one after another.

A decode step streams every weight once per token. Read from 4 KiB pages, a matrix of a few MB costs a
page walk every 4 KiB, and a call that starts on a fresh matrix starts a fresh stream: measured on an
Intel Xeon with AVX-512 and a 480 MB L3 (2 threads, matrices cycled over 512 MB), the matrix-vector loop
read stories110M's 768 x 768 to 32000 x 768 fp32 matrices at 22-23 GB/s from separately allocated arrays,
at 28-32 GB/s from one block of huge pages, and a plain parallel sum read 6 MB arrays at 27 GB/s against 39 GB/s.
Linux backs a private anonymous mapping with huge pages where it is advised to (`MADV_HUGEPAGE`, which
the default `transparent_hugepage=madvise` honours); elsewhere the block is ordinary memory and nothing
else changes.

`pack` copies tensors into one block (the weights fusec converts, `passes.weights.stored_form`; the
generator's KV caches); `pack_parameters` moves a module's parameters there: each Parameter keeps its
identity and values, its `.data` becomes a view of the block, so eager, in-place updates and a compiled
program that reads the parameters in place all see the same memory.
"""
from __future__ import annotations

import ctypes
import mmap
import threading
import weakref
from collections import Counter

import numpy as np
import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line; the next one follows it, so a stream runs on through both

_BLOCKS: list[weakref.ref] = []  # the blocks made (their base arrays), for `packed`
_BLOCKS_LOCK = threading.Lock()  # (blocks are made in `Packing`'s thread too)


def block(nbytes: int) -> np.ndarray:
    """A uint8 array of `nbytes` zeros, starting on a 2 MiB boundary, in memory advised to use huge pages;
    under a huge page, ordinary memory on a cache line (a huge page would hold it and mostly nothing else)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    align = HUGE_PAGE if nbytes >= HUGE_PAGE else ALIGN
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or not flags:
        raw = np.zeros(nbytes + align, np.uint8)
    else:
        # private, not the default shared mapping: shared anonymous memory is shmem, which the kernel
        # backs with huge pages only under its own setting (usually never)
        memory = mmap.mmap(-1, nbytes + align, flags=flags)
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # transparent huge pages compiled out: ordinary pages
            pass
        raw = np.frombuffer(memory, np.uint8)  # (the array keeps the mapping alive)
    start = (-raw.ctypes.data) % align
    out = raw[start:start + nbytes]
    with _BLOCKS_LOCK:
        _BLOCKS[:] = [b for b in _BLOCKS if b() is not None] + [weakref.ref(raw)]
    return out


def zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of zeros in a block of its own (fresh anonymous memory reads as zeros)."""
    size = int(np.prod(shape)) * dtype.itemsize
    return torch.from_numpy(block(size)).view(dtype).view(shape)


def fault_in(tensors: list[torch.Tensor]) -> threading.Thread:
    """A started thread writing zeros over `tensors` (fresh blocks from `zeros`, still zero), so the
    kernel gives their pages memory now rather than at their first writes: a 1B model's KV caches (184 MB)
    took a warm start's first prompt 0.05-0.2 s of page faults. Join it before anything else writes them
    (reading is fine: they hold zeros throughout)."""
    # (memset through ctypes: one core, without the GIL; torch's zero_ would take every core's thread)
    thread = threading.Thread(target=lambda: [ctypes.memset(t.data_ptr(), 0, t.numel() * t.element_size())
                                              for t in tensors], daemon=True)
    thread.start()
    return thread


def packed(t: torch.Tensor) -> bool:
    """Whether tensor `t`'s memory lies in a block made here."""
    ptr = t.data_ptr()
    with _BLOCKS_LOCK:
        blocks = [b() for b in _BLOCKS]
    return any(b is not None and b.ctypes.data <= ptr < b.ctypes.data + b.nbytes for b in blocks)


def pack(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (any dtypes and shapes), contiguous, one after another in one new block."""
    if not tensors:
        return []
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    memory = torch.from_numpy(block(total))
    out = []
    for t, start in zip(tensors, offsets):
        size = t.numel() * t.element_size()
        view = memory[start:start + size].view(t.dtype).view(t.shape)
        view.copy_(t.detach())
        out.append(view)
    return out


def pack_parameters(module: torch.nn.Module) -> int:
    """Move `module`'s parameters into one block of huge pages, in the module's order (a decode step's
    order of reading them, layer by layer). Returns the bytes moved. Left where they are: parameters
    already in a block, in shared memory (`share_memory()`: another process may map them), not
    contiguous, or sharing their storage with another parameter (moving one would part them)."""
    return Packing(module).finish()


class Packing:
    """`pack_parameters(module)` begun in a thread: the copies are made there; `finish()` waits for them,
    moves the parameters onto them (in the calling thread) and returns the bytes moved; `ready()` says
    whether it would not wait.

    Why a thread: the kernel assembles fresh 2 MiB pages as the copy first touches them, which took
    0.06-1 s for stories110M's 438 MB (~0.7 s in a warm start, most when free memory is fragmented), and
    it holds up code that maps memory meanwhile (loading compiled kernels took twice as long beside it).
    The generator starts it after a generation's first token and moves the parameters between decode
    steps (`fusec.generate`). A parameter updated in place meanwhile is copied again at `finish`; one replaced
    (`param.data = ...`) stays as replaced."""

    def __init__(self, module: torch.nn.Module):
        params = list(module.parameters())
        storages = Counter(p.untyped_storage().data_ptr() for p in params)
        self.params = [p for p in params if p.device.type == "cpu" and p.is_contiguous() and not p.is_shared()
                       and not packed(p) and storages[p.untyped_storage().data_ptr()] == 1
                       and p.untyped_storage().nbytes() == p.numel() * p.element_size()]
        self.seen = [(p.data_ptr(), p._version) for p in self.params]  # what the copies are copies of
        self.copies: list[torch.Tensor] = []
        self.failed: list[BaseException] = []
        # not a daemon: the interpreter waits for it at exit (torch code killed at shutdown ends the process)
        self.worker = threading.Thread(target=self._copy, name="fusec-pack")
        self.worker.start()

    def _copy(self) -> None:
        try:
            self.copies = pack([p.detach() for p in self.params])
        except BaseException as e:  # noqa: BLE001 - raised again by `finish`, in the caller's thread
            self.failed.append(e)

    def ready(self) -> bool:
        return not self.worker.is_alive()

    def finish(self) -> int:
        self.worker.join()
        if self.failed:
            raise self.failed[0]
        moved = 0
        with torch.no_grad():
            for p, c, (ptr, version) in zip(self.params, self.copies, self.seen):
                if p.data_ptr() != ptr or p.shape != c.shape or p.dtype != c.dtype:
                    continue  # replaced since: the new tensor is the parameter now
                if p._version != version:  # updated in place while it was copied
                    c.copy_(p)
                p.data = c
                moved += p.numel() * p.element_size()
        self.params, self.copies = [], []
        return moved
