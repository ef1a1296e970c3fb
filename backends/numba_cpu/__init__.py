"""The Numba CPU backend: one generated, JIT-compiled function per fused kernel (the reference RDU target)."""
