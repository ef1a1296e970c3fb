"""The trace cache: the traced and the lowered IR of a module, kept on disk so that a warm start runs
neither torch.export nor the passes.

    traced, graph, how = trace_and_lower(module, args, kwargs, dynamic, strict, options, trace, lower)

An entry is keyed by `fusec.trace_key.trace_key` (everything the trace depends on; modules whose code
fusec does not own have no key and are traced every time), the lowered program by that key and the
options of the passes. Entries live in the compile cache directory (`fusec.cache.choose_dir`, the
directory the Numba cache trusts) under `traces/`, one file each:
`<magic> <sha256 of the rest>\\n` then an .npz holding the JSON header (graph, signature) and the
constant arrays; no pickle anywhere (np.load with allow_pickle=False). Parameters are not stored: they
are the module's own tensors, found by name when loaded (and converted to the stored weight format of
the lowered program, `passes.weights.stored_form`), so the program follows the module as when traced.

A file whose checksum, format or key does not match (truncated, damaged, planted, copied from another
key) is discarded with a warning and the module is traced again. Files are written through a temporary
file and `os.replace`, so a reader sees a whole file or none. When no cache directory can be used,
nothing is cached.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from typing import Any, Callable

import numpy as np
import torch.utils._pytree as pytree

from fusec.cache import choose_dir
from fusec.cache_manifest import write_atomic
from fusec.cache_trust import untrusted
from fusec.debug import debug
from fusec.dtypes import from_torch
from fusec.export import UnstorableValue, graph_from_data, graph_to_data
from fusec.ir import Graph, TensorType, param_types
from fusec.passes.weights import module_names, stored_form
from fusec.trace_key import NoKey, passes_key, trace_key
from fusec.tracing import Traced

MAGIC = b"fusec-trace-1 "
SUBDIR = "traces"


def trace_and_lower(module: Any, args: tuple, kwargs: dict, dynamic: Any, strict: bool, options: dict,
                    trace: Callable[[], Any], lower: Callable[[Any], Graph]) -> tuple[Any, Graph, str]:
    """(traced, lowered graph, how): from the cache when both entries are there ("hit"), else `trace()`
    (unless the trace was cached: "lowered") and `lower(traced)`, stored for the next time ("stored"),
    or "uncached: <why>" when the module has no key or no cache directory can be used."""
    try:
        key = trace_key(module, args, kwargs, dynamic, strict)
        options = {**options, **passes_key()}
    except NoKey as e:
        debug(1, f"[fusec] trace cache: {type(module).__name__} is traced every time: {e}")
        traced = trace()
        return traced, lower(traced), f"uncached: {e}"
    directory = cache_directory()
    if directory is None:
        traced = trace()
        return traced, lower(traced), "uncached: no cache directory"
    lowered_key = hashlib.sha256(json.dumps([key, options], sort_keys=True).encode()).hexdigest()[:32]
    traced = load_traced(directory, key, module)
    if traced is not None:
        graph = load_graph(directory, lowered_key, module)
        if graph is not None:
            return traced, graph, "hit"
        how = "lowered"
    else:
        traced, how = trace(), "stored"
        store_traced(directory, key, traced)
    graph = lower(traced)
    store_graph(directory, lowered_key, graph)
    return traced, graph, how


def cache_directory() -> str | None:
    """`traces/` in the compile cache directory (created private), None when there is no usable one."""
    root, _ = choose_dir()  # (the Numba cache warns about a refused directory)
    if root is None:
        return None
    path = os.path.join(root, SUBDIR)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        why = untrusted(path)
    except OSError as e:
        why = str(e)
    if why:
        debug(1, f"[fusec] trace cache: not using {path}: {why}")
        return None
    return path


# --- entries --------------------------------------------------------------------------------------------

def store_traced(directory: str, key: str, traced: Any) -> None:
    try:
        header = {"in_spec": _spec(traced.in_spec), "out_spec": _spec(traced.out_spec),
                  "input_leaves": [_plain(x) for x in traced.input_leaves], "input_names": list(traced.input_names),
                  "module_name": traced.module_name,
                  "output_constants": [[k, _plain(v)] for k, v in traced.output_constants.items()]}
    except UnstorableValue as e:
        debug(1, f"[fusec] trace cache: not storing the trace of {traced.module_name}: {e}")
        return
    _store(directory, key, "trace", traced.graph, header)


def store_graph(directory: str, key: str, graph: Graph) -> None:
    _store(directory, key, "lowered", graph, {})


def load_traced(directory: str, key: str, module: Any):
    """The cached trace of `key` (a `fusec.tracing.Traced` without its fx graph), or None."""
    entry = _load(directory, key, "trace", module)
    if entry is None:
        return None
    header, graph = entry
    return Traced(graph, None, pytree.treespec_loads(header["in_spec"]),
                  pytree.treespec_loads(header["out_spec"]), list(header["input_leaves"]),
                  list(header["input_names"]), header["module_name"], dict(header["output_constants"]))


def load_graph(directory: str, key: str, module: Any) -> Graph | None:
    entry = _load(directory, key, "lowered", module)
    return None if entry is None else entry[1]


def _spec(spec: Any) -> str:
    text = pytree.treespec_dumps(spec)
    if pytree.treespec_loads(text) != spec:
        raise UnstorableValue("a structure that does not read back the same")
    return text


def _plain(v: Any) -> Any:
    if v is None or type(v) in (bool, int, float, str):
        return v
    raise UnstorableValue(f"a constant of type {type(v).__name__}")


def _store(directory: str, key: str, kind: str, graph: Graph, header: dict) -> None:
    """Write `graph` (and `header`) as entry `key`: its arrays in the file, its parameters by name and type."""
    try:
        pool: dict = {}
        data = graph_to_data(graph, pool)
        params = param_types(graph)
        arrays = {name: t for name, t in pool.items() if name not in params}
        for name, t in arrays.items():
            if not isinstance(t, np.ndarray) or t.dtype.hasobject:
                raise UnstorableValue(f"the constant {name} is a {type(t).__name__}")
        back = graph_from_data(json.loads(json.dumps(data)), {**pool})
        if back != graph:  # (a NaN attribute, say): what is read must be exactly what was traced
            raise UnstorableValue("a graph that does not read back equal")
    except UnstorableValue as e:
        debug(1, f"[fusec] trace cache: not storing a {kind} entry: {e}")
        return
    names = {name: f"a{k}" for k, name in enumerate(arrays)}
    header = {**header, "key": key, "kind": kind, "graph": data, "arrays": names,
              "params": {name: [list(t.shape), t.dtype] for name, t in params.items()}}
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
             **{names[name]: np.ascontiguousarray(t) for name, t in arrays.items()})
    body = buffer.getvalue()
    try:
        write_atomic(_path(directory, key, kind), MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    except OSError as e:
        debug(1, f"[fusec] trace cache: cannot write {kind} entry {key}: {e}")


def _path(directory: str, key: str, kind: str) -> str:
    return os.path.join(directory, f"{key}.{kind}")


class _Damaged(Exception):
    pass


def _load(directory: str, key: str, kind: str, module: Any) -> tuple[dict, Graph] | None:
    """(header, graph) of entry `key`, its parameters the module's; None when absent, when the module no
    longer has them, or (with a warning, the file removed) when the file is not one fusec wrote for it."""
    path = _path(directory, key, kind)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        debug(1, f"[fusec] trace cache: cannot read {path}: {e}")
        return None
    try:
        header, arrays = _parse(raw, key, kind)
        params = {name: TensorType(tuple(shape), dtype) for name, (shape, dtype) in header["params"].items()}
    except (_Damaged, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"fusec: the cached trace {path} is damaged or was not written by fusec for this "
                      f"module ({e}); discarding it and tracing again", stacklevel=5)
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    weights = _module_weights(module, params)
    if weights is None:
        return None
    try:
        return header, graph_from_data(header["graph"], {**arrays, **weights})
    except (ValueError, KeyError, TypeError) as e:  # a checksummed file fusec wrote: not expected
        debug(1, f"[fusec] trace cache: cannot read {path}: {e}")
        return None


def _parse(raw: bytes, key: str, kind: str) -> tuple[dict, dict]:
    first, _, body = raw.partition(b"\n")
    if not first.startswith(MAGIC):
        raise _Damaged("not a trace cache file of this fusec")
    if first[len(MAGIC):].decode("ascii", "replace") != hashlib.sha256(body).hexdigest():
        raise _Damaged("its checksum does not match")
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:
        files = {name: npz[name] for name in npz.files}
    header = json.loads(files.pop("header").tobytes().decode())
    if header.get("key") != key or header.get("kind") != kind:
        raise _Damaged(f"it is the entry of {header.get('kind')} {header.get('key')}")
    return header, {name: files[stored] for name, stored in header["arrays"].items()}


def _module_weights(module: Any, types: dict) -> dict | None:
    """{name: the module's tensor in the form the program reads} for the parameters `types` names, or
    None if one is missing or does not fit (the key covers them: not expected)."""
    found = {}
    for name in module_names(types):
        try:
            found[name] = module.get_parameter(name)
        except AttributeError:
            debug(1, f"[fusec] trace cache: the module has no parameter {name}")
            return None
    stored = stored_form(types, found)
    for name, want in types.items():
        t = stored.get(name)
        if t is None or tuple(t.shape) != want.shape or from_torch(t.dtype) != want.dtype:
            debug(1, f"[fusec] trace cache: parameter {name} does not fit {want}")
            return None
    return {name: stored[name] for name in types}
