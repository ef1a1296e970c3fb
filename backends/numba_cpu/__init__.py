"""The Numba CPU backend: one generated, JIT-compiled function per fused kernel (the reference RDU target).

Numba's `workqueue` threading layer is chosen when nothing has fixed the layer yet: its idle threads
sleep, while OpenMP's spin and steal the cores from BLAS and from PyTorch running in the same process
(measured: matrix-vector kernels run 4x slower under the OpenMP layer on a 2-core machine).
"""
import numba

if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"
