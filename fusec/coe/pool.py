"""A pool of experts served on one machine: one compiled generator per architecture, one weight store.

Experts of one architecture share a `fusec.generate.Generator`: its prefill and decode programs are
compiled once (from the first expert of that architecture) and take weights as arguments, so switching
experts binds another expert's resident tensors and never recompiles. A request pins its expert in the
store (`WeightStore.use`), binds it if another expert is bound, and generates; requests to one
architecture run one at a time (the generator owns its KV cache), requests to different ones in parallel.
"""
from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Mapping

import numpy as np

from fusec.coe.experts import Architecture, ExpertError, FileExpert, as_expert, conform, nbytes, program_names
from fusec.coe.store import Policy, WeightStore
from fusec.generate import Generator, compile_generator
from fusec.models.causal_lm import load_hf_weights
from fusec.passes.place import plan


class ArchitectureSlot:
    """The generator of one architecture, the expert bound to it, and the lock its requests take."""

    def __init__(self, generator: Generator, arch: Architecture):
        self.generator, self.arch = generator, arch
        self.types = generator.weight_types()
        self.names = program_names(arch, self.types)
        self.bound: str | None = None
        self.bound_weights: dict | None = None  # the resident tensors bound (kept alive by the binding)
        self.lock = threading.Lock()


class ExpertPool:
    """Experts `{name: safetensors path or Llama model}` served with at most `hbm_bytes` of resident weights.

    Experts whose file is missing or damaged are left out with a warning (`unavailable` says why);
    a request for one raises ExpertError naming it, and the others keep serving.
    """

    def __init__(self, experts: Mapping[str, Any], hbm_bytes: int, weights: str = "bf16", max_seq_len: int = 256,
                 prompt_buckets: tuple[int, ...] | None = None, policy: str | Policy = "lru",
                 backend: str = "numba"):
        if not experts:
            raise ValueError("a pool needs at least one expert, given none")
        self.experts, self.unavailable = {}, {}
        for name, source in experts.items():
            try:
                self.experts[name] = as_expert(name, source)
            except ExpertError as e:
                self.unavailable[name] = str(e)
                warnings.warn(f"fusec CoE: {e}; serving without it", stacklevel=2)
        self.options = dict(weights=weights, max_seq_len=max_seq_len, prompt_buckets=prompt_buckets,
                            backend=backend)
        self.slots: dict[Architecture, ArchitectureSlot] = {}
        self._sizes: dict[str, int] = {}
        self._compile_lock = threading.Lock()
        self.store = WeightStore(hbm_bytes, self.load_expert, self.expert_bytes, policy, self._recycle)
        # The buffers of file experts by name, and at most one of an evicted expert, which the next load
        # of the same size reads into: the store made room for that load by evicting it, so the memory is
        # in the budget. Nothing runs on an evicted expert's weights: a request binds the weights of the
        # resident expert it pinned whenever they are not the ones bound.
        self._buffers: dict[str, Any] = {}
        self._spare = None
        self._sram: dict = {}  # architecture -> modelled SRAM working set (see `tiers`)
        self._spare_lock = threading.Lock()
        self.switches, self.switch_seconds = 0, []

    # --- experts and their weights ---------------------------------------------------------------------

    def expert(self, name: str):
        if name in self.unavailable:
            raise ExpertError(name, f"unavailable ({self.unavailable[name]})")
        if name not in self.experts:
            raise KeyError(f"no expert named {name!r}; experts: {', '.join(sorted(self.experts))}")
        return self.experts[name]

    def slot(self, arch: Architecture) -> ArchitectureSlot:
        """The architecture's generator, compiled on first need from the first expert that needs it."""
        with self._compile_lock:
            if arch not in self.slots:
                template = next(e for e in self.experts.values() if e.architecture == arch)
                model = template.model if hasattr(template, "model") else _model_of(template)
                o = self.options
                generator = compile_generator(model, o["max_seq_len"], o["weights"], o["backend"], o["prompt_buckets"])
                self.slots[arch] = ArchitectureSlot(generator, arch)
            return self.slots[arch]

    def load_expert(self, name: str) -> tuple[dict, int]:
        """Read an expert from its DDR tier and convert it to its program's weights: (weights, bytes)."""
        expert = self.expert(name)
        slot = self.slot(expert.architecture)
        if not isinstance(expert, FileExpert):
            tensors = expert.load()
        else:
            with self._spare_lock:
                spare, self._spare = self._spare, None
            buffer = spare if spare is not None and spare.nbytes == expert.data_bytes else expert.new_buffer()
            tensors = expert.load(buffer)
            with self._spare_lock:
                self._buffers[name] = buffer
        weights = conform(name, tensors, slot.types, slot.names)
        return weights, nbytes(weights)

    def _recycle(self, name: str) -> None:
        """An expert was evicted: keep its buffer for the next load (see __init__)."""
        with self._spare_lock:
            buffer = self._buffers.pop(name, None)
            if buffer is not None:
                self._spare = buffer

    def expert_bytes(self, name: str) -> int:
        """Resident size of an expert, known before it is loaded: a file's data section (read whole) plus
        the tensors converted to the program's dtypes; a model's weights at the program's dtypes."""
        if name not in self._sizes:
            expert = self.expert(name)
            slot = self.slot(expert.architecture)
            entries = getattr(expert, "entries", None)
            size = expert.data_bytes if entries else 0
            for param, t in slot.types.items():
                stored = entries[slot.names[param]]["dtype"] if entries else None
                if stored != ("BF16" if t.dtype == "bf16" else "F32"):  # converted (int8: quantized)
                    size += t.nbytes
            self._sizes[name] = size
        return self._sizes[name]

    # --- requests --------------------------------------------------------------------------------------

    def generate(self, name: str, prompt_ids, max_new_tokens: int = 32, **options) -> dict:
        """Generate with expert `name`: {tokens, expert, outcome (see `WeightStore.use`), switched, switch_seconds, generate_seconds,
        new_tokens}. `switch_seconds` is the time from the request to the expert's weights bound: the
        load on a miss, the wait on a prefetch in flight, the binding."""
        expert = self.expert(name)
        slot = self.slot(expert.architecture)
        start = time.perf_counter()
        with self.store.use(name) as (resident, outcome), slot.lock:
            switched = slot.bound != name
            if slot.bound_weights is not resident.weights:  # another expert, or this one loaded anew
                slot.generator.bind_weights(resident.weights)
                slot.bound, slot.bound_weights = name, resident.weights
            ready = time.perf_counter()
            tokens = slot.generator.generate(prompt_ids, max_new_tokens=max_new_tokens, **options)
            done = time.perf_counter()
        if switched:
            self.switches += 1
            self.switch_seconds.append(ready - start)
        return dict(tokens=tokens, expert=name, outcome=outcome, switched=switched, switch_seconds=ready - start,
                    generate_seconds=done - ready, new_tokens=int(tokens.shape[-1]) - _prompt_len(prompt_ids))

    def prefetch(self, name: str) -> bool:
        """Start loading an expert in the background (see `WeightStore.prefetch`)."""
        if name not in self.experts:
            return False
        return self.store.prefetch(name)

    def store_stats(self) -> dict:
        """The weight store's figures (see `CoE.stats`)."""
        return store_summary(self.store)

    def tiers(self) -> dict:
        """The three tiers in bytes: DDR (every available expert's file or model), HBM (resident, and the
        budget), SRAM (per architecture, modelled: the largest on-chip working set of its decode program's
        sections as placed on SN40L, stage buffers double-buffered; weights stream through it)."""
        sram = {}
        for arch, slot in self.slots.items():
            if arch not in self._sram:  # placing the program on the chip is an analysis: done once, on request
                self._sram[arch] = sram_working_set(plan(slot.generator.decode_program(1).graph, "sn40l"))
            sram[str(arch)] = self._sram[arch]
        ddr = sum(getattr(e, "data_bytes", 0) or self.expert_bytes(n) for n, e in self.experts.items())
        return dict(ddr_bytes=ddr, hbm_bytes=self.store.hbm_bytes, hbm_resident_bytes=self.store.resident_bytes,
                    sram_bytes=sram)

    def reset_stats(self) -> None:
        self.store.reset_stats()
        self.switches, self.switch_seconds = 0, []

    def evict_all(self) -> None:
        self.store.evict_all()

    def warm(self) -> None:
        """Compile every architecture's programs now (the first request would otherwise)."""
        for arch in {e.architecture for e in self.experts.values()}:
            self.slot(arch)

    def close(self) -> None:
        self.store.close()


def sram_working_set(placement) -> int:
    """Bytes of PMU buffers in use at once: the fullest section of a placed program."""
    per_section: dict[int, int] = {}
    for buffer in placement.buffers:
        per_section[buffer.section] = per_section.get(buffer.section, 0) + buffer.capacity
    return max(per_section.values(), default=0)


def store_summary(store: WeightStore) -> dict:
    s = store.stats
    loads = s.load_seconds
    return dict(loads=s.loads, load_p50_s=float(np.percentile(loads, 50)) if loads else None,
                load_p99_s=float(np.percentile(loads, 99)) if loads else None, evictions=s.evictions,
                prefetches=s.prefetches, prefetches_used=s.prefetches_used, prefetches_skipped=s.prefetches_skipped,
                load_failures=s.failures, resident_experts=len(store.resident), resident_bytes=store.resident_bytes,
                peak_bytes=s.peak_bytes, hbm_bytes=store.hbm_bytes)


def _model_of(expert):
    """A CausalLM holding a file expert's weights (float32): the template its architecture compiles from."""
    return load_hf_weights(expert.architecture.config, expert.architecture.tied, expert.load())


def _prompt_len(prompt_ids) -> int:
    shape = getattr(prompt_ids, "shape", None)
    return int(shape[-1]) if shape is not None else len(prompt_ids)
