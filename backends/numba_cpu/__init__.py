"""The Numba CPU backend: one generated, JIT-compiled function per fused kernel (the reference RDU target).

Threading: Numba's default layer (OpenMP where available) is kept. Its idle threads spin briefly, which
makes a parallel loop cost about 2 microseconds to start, against about 130 for the `workqueue` layer
whose threads sleep; a decode step launches dozens of small parallel loops, so the start-up cost decides.
GEMMs call MKL from torch's library on the same threads as the parallel loops (see mkl.py, gemm.py).
"""

from fusec.backends.numba_cpu.library_cache import install as _install_library_cache

_install_library_cache()  # before any library module defines its functions (library_cache.py says why)
