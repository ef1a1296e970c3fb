"""Matrix-vector and GEMM kernels over low-precision weights: bfloat16 bits (uint16) and int8 blocks.

Decode streams every weight once per token, so these kernels must turn the halved (bf16) or quartered
(int8) bytes into time saved, which only happens when the widening to float32 is vectorized:

- bf16: 32 weights (64 bytes) are one vector load; unpacking their 16-bit halves against zeros makes
  two vectors of float32 whose top halves are the weights' bits (`simd._widen`), summed by two FMAs into
  the row's one accumulator; the activations are permuted to the unpacks' order once per call
  (`matvec.widened`). Written in LLVM IR (`simd.float_dot`, which fp32 shares). History, measured side by side: the
  loop Numba vectorized itself split the activations into two new arrays per call and ended every row
  with a scalar remainder; an IR loop of shifts and masks into two accumulators a row took bf16's bytes
  per second from 0.9-1.2x fp32's to 1.5-1.6x at stories110M's shapes (one thread, one activation row,
  weights in cache); streamed from memory it read 0.6-0.85x fp32's bytes per second until the next
  group's rows were prefetched (`simd.prefetch`: short streams the hardware prefetcher does not ramp up
  on), then 0.85-1.05x. The unpacks need fewer instructions per byte (no mask, no constant reloaded per
  chunk): `simd.float_dot` says what they gained. The loop waits on its loads, not on the widening, so
  each weight line is fetched ahead (`simd.PREFETCH`).
- int8: integer dot products against activations quantized the same way, in `int8.py` (re-exported
  here: generated code imports every low-precision kernel from this module).

The loops ask LLVM for 512-bit vectors (`blas.wide_vectors`), so that the IR's 16-lane vectors are single
registers on AVX-512 (LLVM otherwise prefers 256-bit ones there; measured at stories15M's K = 288, the two
widths ran alike).

The loop over groups of rows, and over two or three matrices that read the same activations
(`matvec2_*`, `matvec3_*`), is every format's (`matvec.py`). Large row counts (prefill) widen a block of
weight rows to a float32 tile and call the GEMM (`blas.gemm_bf16`, `int8.gemm_int8`).
"""
from __future__ import annotations

from fusec.backends.numba_cpu.blas import gemm  # noqa: F401  (gemm_bf16 lives in blas)
from fusec.backends.numba_cpu.int8 import gemm_int8, matvec2_int8, matvec3_int8, matvec_int8  # noqa: F401
from fusec.backends.numba_cpu.matvec import FASTMATH as _FASTMATH  # noqa: F401
from fusec.backends.numba_cpu.matvec import matvec, matvec2, matvec3

# c[M, N] = a[M, K] @ w[N, K]^T with bfloat16 weights (uint16 bits), for a few rows M (decode): the fp32
# kernels, which read uint16 weights as bf16 pairs (`matvec.operands`); `matvec2_bf16` and `matvec3_bf16`
# run two or three matrices that read the same activations in one parallel loop.
matvec_bf16, matvec2_bf16, matvec3_bf16 = matvec, matvec2, matvec3
