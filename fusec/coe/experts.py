"""Experts and the DDR tier: where each expert's weights live until it is needed.

An expert is a Llama causal LM of some architecture (config and tied embeddings). Its weights come from
a safetensors file (`FileExpert`: one file per expert, in the Hugging Face layout `save_safetensors`
writes, the config in the file's metadata) or from a model in memory (`ModuleExpert`). Registering a file
reads only its header, which is checked against the architecture; the tensors are read when the weight
store loads the expert (the header read again: see `FileExpert`), with one read of the data section into
one buffer (the read releases the GIL, so a background load overlaps generation), and viewed as tensors
without another copy.

`conform` turns an expert's tensors into what a compiled program reads: its parameter names, and the
dtypes it was compiled for (bf16 matrices with weights="bf16"; small weights float32).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import astuple, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fusec.errors import FusecError
from fusec.models.causal_lm import (CONFIG_KEY, HF_NAMES, CausalLM, config_from_hf, config_to_hf, from_hf,
                                    hf_names)
from fusec.models.llama import LlamaConfig
from fusec.passes.weights import SCALE, quantize_int8

DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16, "F64": torch.float64}
HEADER_LIMIT = 100 << 20  # a header past 100 MB is not a safetensors file


class ExpertError(FusecError, RuntimeError):
    """An expert that cannot serve: its file is missing or damaged, or does not fit its architecture.
    The message names the expert; the other experts keep serving."""

    def __init__(self, expert: str, problem: str):
        self.expert, self.problem = expert, problem
        super().__init__(f"expert {expert!r}: {problem}")

    def __reduce__(self):  # picklable (Ray sends it from an actor to the driver)
        return type(self), (self.expert, self.problem)


@dataclass(frozen=True, eq=False)
class Architecture:
    """What experts must share to share one compiled program (equal configs and tying)."""

    config: LlamaConfig
    tied: bool

    def _key(self) -> tuple:
        return astuple(self.config), self.tied

    def __eq__(self, other) -> bool:
        return isinstance(other, Architecture) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        c = self.config
        return (f"llama dim={c.dim} layers={c.n_layers} heads={c.n_heads}/{c.n_kv_heads} hidden={c.hidden_dim} "
                f"vocab={c.vocab_size}{' tied' if self.tied else ''}")


@cache
def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """{Hugging Face tensor name: shape} of a model of `arch` (computed on the meta device: no memory)."""
    with torch.device("meta"):
        model = CausalLM(arch.config, arch.tied)
    params = dict(model.named_parameters(remove_duplicate=False))
    return {theirs: tuple(params[ours].shape) for ours, theirs in hf_names(arch.config, arch.tied).items()}


class FileExpert:
    """An expert in a safetensors file. The header is read and checked now; the data when `load` runs.

    Every `load` reads the header again (a few KB) before the data. A file rewritten since it was
    registered is read by its new header when that header still describes the same tensors (names,
    dtypes, shapes, and a data section of the same size: only where it starts or where each tensor sits
    differ, as when the metadata changed); a file holding other tensors raises ExpertError naming the
    expert (make a new CoE to serve it: its programs and the weight budget were sized for the registered
    file). Writing the registered file back makes the expert serve again.
    """

    def __init__(self, name: str, path: str | os.PathLike):
        self.name, self.path = name, Path(path)
        with _open(name, self.path) as f:
            self._raw, self.architecture, self.entries, self.data_start, self.data_bytes = _parse(name, self.path, f)

    def new_buffer(self) -> np.ndarray:
        """A writable buffer the size of the data section, for `load`."""
        return np.frombuffer(mmap.mmap(-1, max(self.data_bytes, 1)), np.uint8)[:self.data_bytes]

    def load(self, buffer: np.ndarray | None = None) -> dict[str, Tensor]:
        """The tensors by Hugging Face name, views of one buffer the data section is read into: `buffer`
        (an evicted expert's, of the same size: memory already mapped in is four times quicker to fill
        than new pages) or a new anonymous mapping, returned to the system when the last view goes
        (malloc would keep buffers under its mmap threshold, 32 MiB, in its heap after eviction)."""
        if buffer is None or buffer.nbytes != self.data_bytes:
            buffer = self.new_buffer()
        with _open(self.name, self.path) as f:
            self._check_unchanged(f)
            f.seek(self.data_start)
            try:
                got = f.readinto(memoryview(buffer))
            except OSError as e:
                raise ExpertError(self.name, f"cannot read {self.path}: {e}") from None
        if got != self.data_bytes:
            raise ExpertError(self.name, f"{self.path} is truncated: read {got} of {self.data_bytes} data bytes")
        whole = torch.from_numpy(buffer)
        return {key: whole[start:end].view(DTYPES[e["dtype"]]).view(e["shape"])
                for key, e in self.entries.items() for start, end in [e["data_offsets"]]}

    def _check_unchanged(self, f) -> None:
        """Re-read the header of open file `f`; take a rewritten file's new offsets or refuse it (see the
        class docstring)."""
        size = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))[0]
        if size == len(self._raw) and f.read(size) == self._raw:
            return
        f.seek(0)
        raw, arch, entries, data_start, data_bytes = _parse(self.name, self.path, f)
        layout = {k: (e["dtype"], e["shape"]) for k, e in self.entries.items()}
        same = {k: (e["dtype"], e["shape"]) for k, e in entries.items()} == layout and data_bytes == self.data_bytes
        if arch != self.architecture or not same:
            raise ExpertError(self.name, f"{self.path} was rewritten after it was registered and now holds other "
                                         f"tensors ({arch}, {data_bytes} data bytes; registered: "
                                         f"{self.architecture}, {self.data_bytes} bytes; or other dtypes): "
                                         f"make a new CoE to serve it")
        self._raw, self.entries, self.data_start, self.data_bytes = raw, entries, data_start, data_bytes

    def __repr__(self) -> str:
        return f"FileExpert({self.name!r}, {str(self.path)!r}, {self.architecture})"


class ModuleExpert:
    """An expert held in memory: a fusec CausalLM or a transformers LlamaForCausalLM."""

    def __init__(self, name: str, model: nn.Module):
        self.name = name
        try:
            self.model = model if isinstance(model, CausalLM) else from_hf(model)
        except TypeError as e:
            raise ExpertError(name, f"is not a Llama model: {e}") from None
        self.architecture = Architecture(self.model.config, self.model.tie_embeddings)
        self.path = None

    def load(self) -> dict[str, Tensor]:
        """The model's own tensors (nothing is read)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return {theirs: params[ours].detach() for ours, theirs in
                hf_names(self.architecture.config, self.architecture.tied).items()}

    def __repr__(self) -> str:
        return f"ModuleExpert({self.name!r}, {self.architecture})"


def as_expert(name: str, source) -> FileExpert | ModuleExpert:
    """An expert from a file path or a model (ExpertError for an unusable file, TypeError for anything else)."""
    if isinstance(source, (FileExpert, ModuleExpert)):
        return source
    if isinstance(source, (str, os.PathLike)):
        return FileExpert(name, source)
    if isinstance(source, nn.Module):
        return ModuleExpert(name, source)
    raise TypeError(f"expert {name!r}: expected a safetensors path or a Llama model, given {type(source).__name__}")


def _open(name: str, path: Path):
    """`path` opened for reading; ExpertError naming the expert when it cannot be."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ExpertError(name, f"file {path} does not exist") from None
    except OSError as e:
        raise ExpertError(name, f"cannot read {path}: {e}") from None


def _parse(name: str, path: Path, f) -> tuple[bytes, Architecture, dict, int, int]:
    """(the raw header, the architecture, the tensor entries, the data section's offset and size) of the
    expert file open as `f`, every field checked. Sizes are checked against the file's size before any
    work that grows with them (a config claiming a million layers costs nothing)."""
    file_size = os.fstat(f.fileno()).st_size
    raw, header, data_start = read_header(name, path, f)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or CONFIG_KEY not in meta:
        raise ExpertError(name, f"{path} records no model config in its metadata (write expert files "
                                f"with fusec.models.causal_lm.save_safetensors)")
    try:
        arch = Architecture(*config_from_hf(json.loads(meta[CONFIG_KEY])))
    except (ValueError, KeyError, TypeError, ArithmeticError) as e:
        raise ExpertError(name, f"{path} has an unusable config: {e}") from None
    check_config(name, path, arch, len(header), file_size - data_start)
    data_bytes = check_entries(name, path, header, arch, file_size - data_start)
    return raw, arch, header, data_start, data_bytes


def read_header(name: str, path: Path, f) -> tuple[bytes, dict, int]:
    """(the raw JSON header, the header, the offset of the data section) of the safetensors file open as
    `f`, read from its start."""
    try:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ExpertError(name, f"{path} is not a safetensors file (only {len(prefix)} bytes)")
        (size,) = struct.unpack("<Q", prefix)
        if size > HEADER_LIMIT:
            raise ExpertError(name, f"{path} is not a safetensors file (header size {size})")
        raw = f.read(size)
    except OSError as e:
        raise ExpertError(name, f"cannot read {path}: {e}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ExpertError(name, f"{path} has a damaged safetensors header ({e})") from None
    return raw, header, 8 + size


CONFIG_INTS = ("dim", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len", "vocab_size", "n_layers")


def check_config(name: str, path: Path, arch: Architecture, entries: int, data_size: int) -> None:
    """The config's sizes are positive integers, each a tensor extent within the `data_size` bytes the
    file holds after its header, and they imply as many tensors as the header lists (computed, not
    enumerated: the file's size bounds the work that follows)."""
    c = arch.config
    bad = {k: getattr(c, k) for k in CONFIG_INTS if type(getattr(c, k)) is not int or getattr(c, k) <= 0}
    if bad:
        raise ExpertError(name, f"{path} has an unusable config: expected positive integers, given {bad}")
    bad = {k: getattr(c, k) for k in ("norm_eps", "rope_theta")
           if type(getattr(c, k)) not in (int, float) or not math.isfinite(getattr(c, k))}
    if bad:
        raise ExpertError(name, f"{path} has an unusable config: expected finite numbers, given {bad}")
    extents = {"hidden_size": c.dim, "intermediate_size": c.hidden_dim, "vocab_size": c.vocab_size}
    big = {k: v for k, v in extents.items() if v * min(t.itemsize for t in DTYPES.values()) > data_size}
    if big:
        raise ExpertError(name, f"{path} does not hold a model of its config: {big} imply tensors larger than "
                                f"the {data_size} bytes the file holds after its header")
    per_layer = sum("{i}" in ours for ours, _ in HF_NAMES)
    tensors = c.n_layers * per_layer + sum("{i}" not in ours for ours, _ in HF_NAMES) - (1 if arch.tied else 0)
    if tensors != entries:
        raise ExpertError(name, f"{path} does not hold a model of its config: num_hidden_layers={c.n_layers} "
                                f"implies {tensors} tensors, the header lists {entries}")


def check_entries(name: str, path: Path, header: dict, arch: Architecture, data_size: int) -> int:
    """The data section's size, after checking every tensor's name, dtype, shape and extent (within the
    `data_size` bytes the file holds after its header)."""
    try:
        want = expected_shapes(arch)
    except (RuntimeError, OverflowError, ValueError, TypeError, MemoryError) as e:  # sizes past int64
        first = str(e).splitlines()[0] if str(e) else type(e).__name__  # torch appends a C++ backtrace
        raise ExpertError(name, f"{path} does not hold a model of its config ({arch}): {first}") from None
    missing, unexpected = sorted(set(want) - set(header)), sorted(set(header) - set(want))
    if missing or unexpected:
        raise ExpertError(name, f"{path} does not hold a model of {arch}: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
    end = 0
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise ExpertError(name, f"{path}: {key} is described by {type(entry).__name__}, expected an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ExpertError(name, f"{path}: {key} has dtype {dtype!r}, expected one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape) or tuple(shape) != want[key]:
            raise ExpertError(name, f"{path}: {key} has shape {shape!r}, expected {list(want[key])}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ExpertError(name, f"{path}: {key} has data_offsets {offsets!r}, expected [start, stop]")
        start, stop = offsets
        nbytes = int(np.prod(shape)) * DTYPES[dtype].itemsize
        if stop - start != nbytes or start < 0:
            raise ExpertError(name, f"{path}: {key} spans bytes {start}..{stop}, expected {nbytes} bytes")
        if stop > data_size:
            raise ExpertError(name, f"{path} is truncated: {key} ends at data byte {stop}, the file holds "
                                    f"{data_size} after its header")
        end = max(end, stop)
    return end


def save_expert(model: CausalLM, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `model` as an expert file: its tensors in `dtype` (bf16 by default), its config in the metadata."""
    from safetensors.torch import save_file  # an optional package (the `models` extra): loaded on use
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {theirs: params[ours].detach().to(dtype).contiguous()
               for ours, theirs in hf_names(model.config, model.tie_embeddings).items()}
    save_file(tensors, str(path), metadata={CONFIG_KEY: json.dumps(config_to_hf(model.config, model.tie_embeddings)),
                                            "format": "pt"})
    return path


def conform(expert: str, tensors: dict[str, Tensor], types: dict, names: dict[str, str]) -> dict[str, Tensor]:
    """{program parameter name: tensor} in the program's dtypes, from an expert's tensors by HF name.
    `types` is the program's {parameter name: TensorType}; `names` maps each to its HF name. A tensor
    already in the right dtype is used as it is (no copy); int8 weights are quantized with their scales
    (`passes.weights.quantize_int8`)."""
    out = {}
    for name, want in types.items():
        t = tensors[names[name]]
        if want.dtype == "i8":
            out[name], out[name + SCALE] = quantize_int8(t)
            continue
        if name in out:  # an int8 weight's scales, made with it
            continue
        dtype = torch.bfloat16 if want.dtype == "bf16" else torch.float32
        out[name] = t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()
    return out


def program_names(arch: Architecture, types: dict) -> dict[str, str]:
    """{program parameter name (the model's own name): HF name}; a tied head maps to the embedding, the
    scales of an int8 weight to that weight."""
    theirs = hf_names(arch.config, arch.tied)
    if arch.tied:
        theirs = {**theirs, "output.weight": theirs["tok_embeddings.weight"]}
    theirs.update({name + SCALE: theirs[name] for name in list(theirs) if name + SCALE in types})
    unknown = sorted(set(types) - set(theirs))
    if unknown:
        raise FusecError(f"internal: the compiled program reads weights the model does not have: {unknown[:3]}")
    return {name: theirs[name] for name in types}


def nbytes(tensors: dict[str, Tensor]) -> int:
    """Bytes of distinct storage (a tied matrix counts once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
    return sum(seen.values())
