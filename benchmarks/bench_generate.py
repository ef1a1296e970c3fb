"""Whole-model generation tokens/s: PyTorch eager with a KV cache, torch.compile, fusec fp32 and bf16.

    python benchmarks/bench_generate.py [stories15M stories42M ...] [--new-tokens 256] [--out bench_out]

The same benchmark is `fusec bench generate MODEL`; the code lives in `fusec/bench_generate.py`.
"""
import sys

from fusec.bench_generate import main

if __name__ == "__main__":
    sys.exit(main())
