"""GEMMs from the MKL that PyTorch's CPU library links, called from generated kernels.

The torch CPU wheel's libtorch_cpu exports MKL's Fortran `sgemm_`, its bf16 x bf16 -> f32
`cblas_gemm_bf16bf16f32` and `MKL_Set_Num_Threads_Local` as dynamic symbols. torch is a dependency and is
loaded before any kernel runs, so binding them costs no install weight, and MKL's sgemm is faster here than
the OpenBLAS NumPy ships (docs/numba-backend.md). The symbols are bound by name (`ExternalFunction`) after
making the library visible to LLVM, so Numba's on-disk cache stays valid across processes.

Threads: MKL in libtorch runs its own OpenMP pool (torch's libgomp), Numba another one (the system
libgomp). Two pools on the same cores fight: one pool's threads keep spinning after its region while the
other's run. So a GEMM here runs inside a Numba parallel loop, one block of output columns per Numba
thread, each block one single-threaded MKL call (`MKL_Set_Num_Threads_Local(1)` on that thread, restored
after): one pool, sized by Numba's thread count (fusec's setting), and the kernel's parallel prologue and
epilogue around the call use the same threads. MKL blocks each call for the caches itself.

`FUSEC_BLAS=openblas` (read at every compile) makes generated code call NumPy's OpenBLAS (`blas.gemm`)
instead; without the symbols (a torch build without MKL) that is also what happens, and `blas_choice()`
says why (compile stats `blas` / `blas_note`, FUSEC_DEBUG=1).
"""
from __future__ import annotations

import os

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fusec.backends.numba_cpu import onednn
from fusec.backends.numba_cpu.blas import _f32_as_bits, _ptr
from fusec.backends.numba_cpu.int8_dot import _target_features
from fusec.errors import FusecError

SYMBOLS = ("sgemm_", "cblas_gemm_bf16bf16f32", "MKL_Set_Num_Threads_Local")
CHOICES = ("onednn", "mkl", "openblas")
COLUMN_ALIGN = 16  # column blocks start at multiples of 16 floats (64 bytes, one cache line)


def _load() -> str:
    """'' when MKL's symbols are bound, else why not."""
    try:  # here, not at the top: a torch that does not import is a reason MKL is unbound, not a crash
        import torch
    except ImportError as e:  # (fusec depends on torch; never expected)
        return f"torch is not importable ({e})"
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not os.path.exists(path):
        return f"no {os.path.basename(path)} in torch's lib directory"
    try:
        llvm.load_library_permanently(path)
    except RuntimeError as e:
        return f"cannot load torch's CPU library ({e})"
    missing = [s for s in SYMBOLS if not llvm.address_of_symbol(s)]
    return f"torch's CPU library exports no {', '.join(missing)}" if missing else ""


UNAVAILABLE = _load()  # '' when MKL is usable


def bf16_gemm_in_hardware() -> bool:
    """Whether prefill GEMMs over bf16 weights call a bf16 x bf16 -> f32 GEMM (`gemm_bf16_mkl`, over
    activations rounded to bf16; its blocks on oneDNN or MKL, `onednn.py`): only where the CPU multiplies
    bf16 itself (AVX512-BF16 or AMX-BF16). Elsewhere MKL emulates it, and widening the weights to float32
    tiles per thread for sgemm (`gemm_widen.gemm_bf16w_mkl`, float32 activations: also closer to the reference) is faster: measured
    on a 2-core AVX-512 + VNNI CPU without either, tinyllama_1b block, 256-token prefill, time over fp32's
    in the same process, alternating processes: the bf16 GEMM 1.14-1.35x, the widened tiles 1.08-1.25x
    (medians 1.27x and 1.15x, 9 and 8 rounds on a busy machine). A CPU that reports the instructions gets
    the bf16 GEMM only if it measured faster there (`bf16_gemm_choice`)."""
    features = _target_features()
    if not {"avx512bf16", "amx-bf16"} & features:
        return False
    import torch
    from fusec.backends.numba_cpu.bf16_gemm_choice import bf16_gemm_faster
    key = f"{llvm.get_host_cpu_name()} {','.join(sorted(features))} torch {torch.__version__} {gemm_blocks()[0]}"
    return bf16_gemm_faster(key, (gemm_bf16_mkl, gemm_mkl))


def blas_choice() -> tuple[str, str]:
    """(library family the GEMMs of a program compiled now call: "mkl" for the per-thread blocks of this
    module, whose blocks oneDNN runs where it is installed (`onednn.py`), or "openblas"; a note why it is
    not MKL or ''). Sets which library runs the blocks (`gemm_blocks`)."""
    wanted = _wanted()
    if wanted not in ("",) + CHOICES:
        raise FusecError(f"FUSEC_BLAS must be one of {', '.join(CHOICES)} (or unset), got {wanted!r}")
    if wanted == "openblas":
        onednn.use(False)
        return "openblas", "FUSEC_BLAS=openblas"
    if UNAVAILABLE:
        if wanted in ("mkl", "onednn"):  # (oneDNN's blocks fall back to MKL's: both needed)
            raise FusecError(f"FUSEC_BLAS={wanted}, but MKL cannot be used: {UNAVAILABLE}")
        onednn.use(False)
        return "openblas", f"MKL unavailable: {UNAVAILABLE}"
    why = onednn.use(wanted != "mkl")
    if wanted == "onednn" and why:
        raise FusecError(f"FUSEC_BLAS=onednn, but oneDNN cannot be used: {why}")
    return "mkl", ""


def gemm_blocks() -> tuple[str, str]:
    """("onednn" or "mkl": the library running the prefill GEMM blocks now, why not oneDNN or '')."""
    why = onednn.use(_wanted() not in ("mkl", "openblas"))
    return ("mkl", why) if why else ("onednn", "")


def _wanted() -> str:
    """FUSEC_BLAS as set ('' when unset)."""
    return os.environ.get("FUSEC_BLAS", "").strip().lower()


_I32 = types.int32
_P = types.voidptr
_sgemm = types.ExternalFunction("sgemm_", types.void(*[_P] * 13))  # Fortran: every argument by reference
_gemm_bf16 = types.ExternalFunction("cblas_gemm_bf16bf16f32", types.void(
    _I32, _I32, _I32, _I32, _I32, _I32, types.float32, _P, _I32, _P, _I32, types.float32, _P, _I32))
_set_local_threads = types.ExternalFunction("MKL_Set_Num_Threads_Local", _I32(_I32))
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


@intrinsic
def _ref(typingctx, value):
    """A pointer to a stack copy of `value` (a Fortran argument passed by reference)."""
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once_value(builder, args[0])
        return builder.bitcast(slot, cgutils.voidptr_t)
    return types.voidptr(value), codegen


@intrinsic
def threads(typingctx):
    """Numba's thread count for the next parallel region (`numba.get_num_threads()`), through the symbol
    the threading layer registers: Numba's own `get_num_threads` in njit code is a ctypes pointer, which
    makes a function uncacheable."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(cgutils.intp_t, []),
                                            "get_num_threads")
        return builder.call(fn, [])
    return types.intp(), codegen


@njit(inline="always")
def column_block(n, threads):
    """Columns per thread: N split evenly, rounded up to COLUMN_ALIGN."""
    per = (n + threads - 1) // threads
    return (per + COLUMN_ALIGN - 1) // COLUMN_ALIGN * COLUMN_ALIGN


# The library calls are functions of their own: called straight from a parallel loop's body, an external
# function makes Numba refuse to cache the kernel ("dynamic globals").
@njit(cache=True, nogil=True)
def _sgemm_beta(a, b, c, b_transposed, beta):
    """One single-threaded MKL sgemm: c = a @ B + beta * c (see `gemm_mkl`; beta 0 does not read c)."""
    m, k = a.shape
    n = c.shape[1]
    # row-major C = A.B is column-major C^T = B^T.A^T: B comes first, no transposes of our own
    before = _set_local_threads(1)
    _sgemm(_ref(np.uint8(84 if b_transposed else 78)), _ref(np.uint8(78)), _ref(np.int32(n)), _ref(np.int32(m)),
           _ref(np.int32(k)), _ref(np.float32(1.0)), _ptr(b), _ref(np.int32(b.strides[0] // 4)), _ptr(a),
           _ref(np.int32(a.strides[0] // 4)), _ref(np.float32(beta)), _ptr(c), _ref(np.int32(c.strides[0] // 4)))
    _set_local_threads(before)


@njit(cache=True, nogil=True)
def sgemm_block(a, b, c, b_transposed):
    """One single-threaded MKL sgemm: c = a @ B (see `gemm_mkl`)."""
    _sgemm_beta(a, b, c, b_transposed, 0.0)


@njit(cache=True, nogil=True)
def product_block(a, b, c, b_transposed, beta):
    """One block of a prefill product on one thread: c = a @ B + beta * c (beta 0 or 1) by oneDNN where it
    runs the blocks (`onednn.py`), else by MKL's sgemm."""
    if not onednn.block(a, b, c, b_transposed, beta != 0.0, onednn.F32):
        _sgemm_beta(a, b, c, b_transposed, beta)


# Generated kernels call it from a parallel loop of their own (one attention block per iteration, see
# `attention_gemm.py`): one single-threaded call per block, on that loop's thread.
gemm_tile_mkl = sgemm_block


@njit(cache=True, nogil=True)
def _gemm_bf16_block(a, w, c):
    """One single-threaded MKL bf16 GEMM: c = a @ w^T (see `gemm_bf16_mkl`)."""
    if onednn.block(a, w, c, True, False, onednn.BF16):
        return
    m, k = a.shape
    n = c.shape[1]
    before = _set_local_threads(1)
    _gemm_bf16(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, np.float32(1.0), _ptr(a), a.strides[0] // 2, _ptr(w),
               w.strides[0] // 2, np.float32(0.0), _ptr(c), c.strides[0] // 4)
    _set_local_threads(before)


@njit(parallel=True, cache=True, nogil=True)
def gemm_mkl(a, b, c, b_transposed):
    """c[M, N] = a[M, K] @ B (B is b[K, N], or b[N, K] transposed when `b_transposed`) by MKL's sgemm,
    one block of columns per Numba thread. Operands have unit stride in their last axis."""
    n = c.shape[1]
    block = column_block(n, threads())
    for t in prange((n + block - 1) // block):
        n0 = t * block
        n1 = min(n, n0 + block)
        product_block(a, b[n0:n1] if b_transposed else b[:, n0:n1], c[:, n0:n1], b_transposed, 0.0)


@njit(parallel=True, cache=True, nogil=True)
def gemm_add_mkl(a, w, c, r):
    """c[M, N] = r[M, N] + a[M, K] @ w[N, K]^T (a residual added to a projection): per thread, its block
    of columns of r copied into c, then MKL's sgemm with beta = 1 adds the product to them, so the sum is
    not a pass of its own over the output after the GEMM (nor the product a buffer of its own). `r` may
    be `c` itself. Operands have unit stride in their last axis."""
    m, n = c.shape
    block = column_block(n, threads())
    for t in prange((n + block - 1) // block):
        n0 = t * block
        n1 = min(n, n0 + block)
        for i in range(m):
            for j in range(n0, n1):
                c[i, j] = r[i, j]
        product_block(a, w[n0:n1], c[:, n0:n1], True, 1.0)


@njit(inline="always")
def _columns(a, w, c, lo, hi, first):
    """The columns [lo, hi) of the concatenation that fall in c = a @ w^T, whose columns start at `first`."""
    n0 = max(lo, first) - first
    n1 = min(hi, first + c.shape[1]) - first
    if n0 < n1:
        product_block(a, w[n0:n1], c[:, n0:n1], True, 0.0)


@njit(parallel=True, cache=True, nogil=True)
def gemm3_mkl(a, w0, c0, w1, c1, w2, c2):
    """c0, c1, c2 = a @ w0^T, a @ w1^T, a @ w2^T (Q, K and V) as one parallel loop over the columns of all
    three: one block of the joint columns per thread, so the threads share the work evenly however the
    products are sized, and a narrow product (K, V of grouped-query heads) is not split into narrower
    calls."""
    n = c0.shape[1] + c1.shape[1] + c2.shape[1]
    block = column_block(n, threads())
    for t in prange((n + block - 1) // block):
        lo = t * block
        hi = min(n, lo + block)
        _columns(a, w0, c0, lo, hi, 0)
        _columns(a, w1, c1, lo, hi, c0.shape[1])
        _columns(a, w2, c2, lo, hi, c0.shape[1] + c1.shape[1])


@njit(cache=True, nogil=True)
def gemm2_mkl(a, w0, c0, w1, c1):
    """c0 = a @ w0^T and c1 = a @ w1^T (W1 and W3) as one parallel loop: `gemm3_mkl` with an empty third
    product (no columns, so no call)."""
    gemm3_mkl(a, w0, c0, w1, c1, w1[:0], c1[:, :0])


@njit(parallel=True, cache=True, nogil=True)
def gemm_bf16_mkl(a, w, c):
    """c[M, N] = a[M, K] @ w[N, K]^T over bfloat16 bits (uint16) a and w, float32 sums and result, by
    MKL's `cblas_gemm_bf16bf16f32`, one block of columns per Numba thread."""
    n = c.shape[1]
    block = column_block(n, threads())
    for t in prange((n + block - 1) // block):
        n0 = t * block
        n1 = min(n, n0 + block)
        _gemm_bf16_block(a, w[n0:n1], c[:, n0:n1])


@njit(inline="always")
def bf16_bits(x):
    """float32 `x` rounded to the nearest bfloat16 (ties to even), as its 16 bits (uint16): what a GEMM
    over bf16 operands reads. NaN stays NaN (quiet), overflow is inf (as `blas.rbf16`)."""
    bits = _f32_as_bits(x)
    if x != x:
        return np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
    bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16(bits >> np.uint32(16))
