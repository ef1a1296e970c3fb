"""Prefill GEMM blocks through oneDNN's matmul primitive, where it is installed (the `onednn-cpu-gomp` wheel).

Why: MKL (in torch's CPU library) keeps its AVX-512 and AVX512-BF16 code for Intel CPUs; on an AMD CPU with
both, one thread of its sgemm ran at ~90 GFLOP/s and its bf16 GEMM no faster, while oneDNN's matmul
(brgemm kernels, chosen by the CPU's features, not its maker) ran at ~200 (fp32) and ~400 (bf16) on one
thread (256 x 2048 x 1024). The prefill GEMMs keep their shape (`mkl.py`): one block of output columns per
Numba thread, each block one single-threaded call; only the library that computes a block changes.

How a block reaches oneDNN: a primitive is made for one shape, data types and strides, so compiled code
cannot make one itself. Each block calls the C symbol `fusec_dnnl_matmul`, a Python callback (ctypes) that
finds or makes the primitive for its thread and shape and runs it (the run itself without the GIL). The
callback costs ~10 us a block, so only blocks of at least `MIN_MACS` multiply-adds go there.

Which library runs is read at run time from the C variable `fusec_gemm_library` (1: oneDNN), not compiled
into kernels: cached kernels serve both, and a process where oneDNN is missing or failed runs MKL. A block
oneDNN refuses (a status other than success) runs on MKL too, and the first such failure is reported on
stderr. FUSEC_BLAS=mkl keeps every block on MKL.

Threads: the library runs OpenMP on torch's runtime, not Numba's; a block is called from a Numba thread and
must run on it alone. A primitive's thread count is fixed when it is made (from that runtime's count on
the thread making it), so the callback sets the count to 1 while it makes one and restores it (torch's own
ops on the main thread read it); runs need no setting (measured: CPU time equal to wall time with the
count back at 2).
"""
from __future__ import annotations

import ctypes as C
import os
import sys
import sysconfig
import threading
from collections import OrderedDict

import llvmlite.binding as llvm
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from fusec.backends.numba_cpu.blas import _ptr

MIN_MACS = 1 << 22  # multiply-adds of a block below which MKL runs it (the callback's cost ~ a 40 us GEMM)
F32, BF16 = 3, 2  # oneDNN's data type codes
_SRC, _WEIGHTS, _DST = 1, 33, 17  # DNNL_ARG_*
_MAX_PRIMITIVES = 64  # per thread (shapes: a few per prompt length); the least recently used go first
_Dims = C.c_int64 * 12  # dnnl_dims_t


class _Arg(C.Structure):
    _fields_ = [("arg", C.c_int), ("memory", C.c_void_p)]


def _library_path() -> str:
    return os.path.join(sysconfig.get_path("data"), "lib", "libdnnl.so.3")


class _OneDNN:
    """The loaded library, its CPU engine and the primitives made so far (per thread and shape)."""

    def __init__(self, path: str):
        self.lib = C.CDLL(path)
        self.engine = C.c_void_p()
        self._ok(self.lib.dnnl_engine_create(C.byref(self.engine), 1, C.c_size_t(0)), "engine")
        self.omp_get = self.lib.omp_get_max_threads  # the OpenMP runtime the library itself calls
        self.omp_set = self.lib.omp_set_num_threads
        self.local = threading.local()  # primitives, memories and a stream per thread: none is shared

    @staticmethod
    def _ok(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN {what}: status {status}")

    def _desc(self, rows: int, cols: int, row_stride: int, col_stride: int, dtype: int) -> C.c_void_p:
        md = C.c_void_p()
        self._ok(self.lib.dnnl_memory_desc_create_with_strides(
            C.byref(md), 2, _Dims(rows, cols), dtype, _Dims(row_stride, col_stride)), "memory descriptor")
        return md

    def _make(self, m, n, k, lda, ldb, ldc, dtype, transposed, accumulate):
        """(primitive, its three memories, their execution arguments) for one block shape; the descriptors
        and attributes that made them are destroyed here (the primitive and memories keep copies)."""
        lib, made = self.lib, []  # made: (destroy function, handle) of what lives only until the primitive
        try:
            descs = [self._desc(m, k, lda, 1, dtype),
                     self._desc(k, n, 1, ldb, dtype) if transposed else self._desc(k, n, ldb, 1, dtype),
                     self._desc(m, n, ldc, 1, F32)]
            made += [(lib.dnnl_memory_desc_destroy, md) for md in descs]
            attr = C.c_void_p()
            if accumulate:  # dst += product (the residual already in dst)
                ops = C.c_void_p()
                self._ok(lib.dnnl_post_ops_create(C.byref(ops)), "post-ops")
                made.append((lib.dnnl_post_ops_destroy, ops))
                self._ok(lib.dnnl_post_ops_append_sum(ops, C.c_float(1.0), 0, 0), "sum post-op")
                self._ok(lib.dnnl_primitive_attr_create(C.byref(attr)), "attributes")
                made.append((lib.dnnl_primitive_attr_destroy, attr))
                self._ok(lib.dnnl_primitive_attr_set_post_ops(attr, ops), "attributes' post-ops")
            pd, prim = C.c_void_p(), C.c_void_p()
            self._ok(lib.dnnl_matmul_primitive_desc_create(C.byref(pd), self.engine, descs[0], descs[1], None,
                                                           descs[2], attr), "matmul descriptor")
            made.append((lib.dnnl_primitive_desc_destroy, pd))
            self._ok(lib.dnnl_primitive_create(C.byref(prim), pd), "matmul primitive")
            memories = []
            try:
                for md in descs:
                    mem = C.c_void_p()
                    self._ok(lib.dnnl_memory_create(C.byref(mem), md, self.engine, None), "memory")
                    memories.append(mem)
            except RuntimeError:
                self._destroy((prim, memories, None))
                raise
        finally:
            for destroy, handle in reversed(made):
                destroy(handle)
        args = (_Arg * 3)(*(_Arg(a, mem) for a, mem in zip((_SRC, _WEIGHTS, _DST), memories)))
        return prim, memories, args

    def _destroy(self, made) -> None:
        prim, memories, _ = made
        for mem in memories:
            self.lib.dnnl_memory_destroy(mem)
        self.lib.dnnl_primitive_destroy(prim)

    def _primitive(self, key: tuple):
        """This thread's primitive for `key`, made if new; the least recently used one destroyed past
        `_MAX_PRIMITIVES` (a server sees many prompt lengths)."""
        local = self.local
        if not hasattr(local, "primitives"):
            local.primitives, local.stream = OrderedDict(), C.c_void_p()
            self._ok(self.lib.dnnl_stream_create(C.byref(local.stream), self.engine, C.c_uint(1)), "stream")
        made = local.primitives.get(key)
        if made is not None:
            local.primitives.move_to_end(key)
            return made
        # made while this thread's OpenMP count is 1, a primitive runs on the calling thread alone
        # whatever the count when it runs (its thread count is fixed when it is made)
        before = self.omp_get()
        self.omp_set(1)
        try:
            made = local.primitives[key] = self._make(*key)
        finally:
            self.omp_set(before)
        while len(local.primitives) > _MAX_PRIMITIVES:
            self._destroy(local.primitives.popitem(last=False)[1])
        return made

    def run(self, a, b, c, m, n, k, lda, ldb, ldc, dtype, transposed, accumulate) -> int:
        prim, memories, args = self._primitive((m, n, k, lda, ldb, ldc, dtype, transposed, accumulate))
        for mem, ptr in zip(memories, (a, b, c)):
            self.lib.dnnl_memory_set_data_handle(mem, C.c_void_p(ptr))
        stream = self.local.stream
        status = self.lib.dnnl_primitive_execute(prim, stream, 3, args)
        return status or self.lib.dnnl_stream_wait(stream)


_LIBRARY_FLAG = C.c_int32(0)  # what `fusec_gemm_library` holds: 1 while oneDNN runs the blocks
_STATE: dict = {"onednn": None, "reason": "", "failed": ""}
_CALLBACK_TYPE = C.CFUNCTYPE(C.c_int64, *[C.c_void_p] * 3, *[C.c_int64] * 9)


def _callback(a, b, c, m, n, k, lda, ldb, ldc, dtype, transposed, accumulate) -> int:
    try:
        return _STATE["onednn"].run(a, b, c, m, n, k, lda, ldb, ldc, dtype, bool(transposed), bool(accumulate))
    except Exception as e:  # a block MKL then runs: reported once, never raised into compiled code
        if not _STATE["failed"]:
            _STATE["failed"] = str(e)
            print(f"fusec: oneDNN failed a GEMM block ({e}); MKL runs such blocks", file=sys.stderr)
        return -1


_CALLBACK = _CALLBACK_TYPE(_callback)
llvm.add_symbol("fusec_dnnl_matmul", C.cast(_CALLBACK, C.c_void_p).value)
llvm.add_symbol("fusec_gemm_library", C.addressof(_LIBRARY_FLAG))


def _load() -> str:
    """'' when oneDNN is loaded and chosen, else why not."""
    path = _library_path()
    if not os.path.exists(path):
        return f"no {os.path.basename(path)} in this environment (the onednn-cpu-gomp package)"
    try:
        _STATE["onednn"] = _OneDNN(path)
    except (OSError, RuntimeError, AttributeError) as e:
        return f"oneDNN does not load ({e})"
    return ""


def use(wanted: bool) -> str:
    """Make the blocks run on oneDNN (when it loads) or MKL; '' when oneDNN runs them, else why not."""
    if wanted and _STATE["onednn"] is None and not _STATE["reason"]:
        _STATE["reason"] = _load()
    reason = _STATE["reason"] if wanted else "not chosen"
    _LIBRARY_FLAG.value = 1 if wanted and not reason else 0
    return reason


@intrinsic
def _library_flag(typingctx):
    """The value of the C variable `fusec_gemm_library` (bound by name, so cached kernels stay valid)."""
    def codegen(context, builder, signature, args):
        module = builder.module
        flag = module.globals.get("fusec_gemm_library") or cgutils.add_global_variable(
            module, llvm_ir.IntType(32), "fusec_gemm_library")
        return builder.sext(builder.load(flag), cgutils.intp_t)
    return types.intp(), codegen


_matmul = types.ExternalFunction("fusec_dnnl_matmul", types.int64(*[types.voidptr] * 3, *[types.int64] * 9))


@njit(cache=True, nogil=True)
def block(a, b, c, b_transposed, accumulate, dtype):
    """c (+)= a @ B by oneDNN (B is b[K, N], or b[N, K] when `b_transposed`; `dtype` F32, or BF16 for
    uint16 bits of a and b); False when it did not run (not chosen, too small, or refused): then the caller
    runs MKL. Operands have unit stride in their last axis."""
    m, k = a.shape
    n = c.shape[1]
    if _library_flag() != 1 or m * n * k < MIN_MACS:
        return False
    size = 2 if dtype == BF16 else 4
    return _matmul(_ptr(a), _ptr(b), _ptr(c), m, n, k, a.strides[0] // size, b.strides[0] // size,
                   c.strides[0] // 4, dtype, 1 if b_transposed else 0, 1 if accumulate else 0) == 0
