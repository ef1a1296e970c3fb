"""float32 exp that LLVM vectorizes: generated kernels call `exp32` for `exp` and `sigmoid` of float32.

Numba lowers np.exp to one libm call per element (no vector math library here), about ten times the cost
of this polynomial, inlined by LLVM, in a loop LLVM vectorizes (measured on 1M floats); softmax and SiLU spend most
of their time there. Accuracy: at most 1.01 ulp from the exact value (measured over [-110, 90]; libm's
expf: 0.5),
the same special values (exp(-inf) = 0, exp(inf) = inf, nan stays nan, overflow past ln(FLT_MAX) to inf)
and the same subnormal results down to the smallest (2^-149); below that 0.

exp(x) = 2^k exp(r) with k = round(x / ln 2) and r = x - k ln 2 (ln 2 in two parts, so r is exact),
|r| <= ln(2)/2, exp(r) by Cephes' degree-7 polynomial (expf.c), and 2^k applied as two powers of two built
from their bits, so that neither overflows nor underflows on its own (k runs from -150 to 128).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from fusec.backends.numba_cpu.blas import _bits_as_f32

LOG_MAX = np.float32(88.72283905206835)   # ln(FLT_MAX): above it exp is inf
LOG_MIN = np.float32(-103.97207708)       # ln(2^-150): below it exp rounds to 0


@njit(inline="always", fastmath={"contract"}, error_model="numpy")
def _pow2(k):
    """2^k for integer-valued float32 k in [-126, 127], from its bits."""
    return _bits_as_f32(np.uint32(np.int32(k) + np.int32(127)) << np.uint32(23))


# Not inline="always": Numba would copy its IR into every call site, where each kernel's parallel-loop
# passes analyse it again (a fifth of an attention kernel's compile). LLVM inlines it into the loops all
# the same (one small function in the kernel's module), so they vectorize as before.
@njit(fastmath={"contract"}, error_model="numpy", cache=True)
def exp32(x):
    """exp of a float32, branch-free (selects only), so loops over it vectorize."""
    xc = min(max(x, LOG_MIN), LOG_MAX)
    k = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - k * np.float32(0.693359375)
    r = r + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500E-4)
    p = p * r + np.float32(1.3981999507E-3)
    p = p * r + np.float32(8.3334519073E-3)
    p = p * r + np.float32(4.1665795894E-2)
    p = p * r + np.float32(1.6666665459E-1)
    p = p * r + np.float32(5.0000001201E-1)
    y = p * r * r + r + np.float32(1.0)
    half = np.floor(k * np.float32(0.5))
    res = y * _pow2(half) * _pow2(k - half)
    res = np.float32(0.0) if x < LOG_MIN else res
    res = np.float32(np.inf) if x > LOG_MAX else res
    return x if x != x else res
