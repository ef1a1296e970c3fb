"""Fused vs unfused vs PyTorch eager vs torch.compile on a Llama block: prefill and a decode step.

    python benchmarks/bench_block.py [--preset tinyllama_1b] [--seq 256] [--past 512] [--out bench_out]

The same benchmark is `fusec bench llama-block:PRESET`; the code lives in `fusec/bench_block.py`.
"""
import sys

from fusec.bench_block import main

if __name__ == "__main__":
    sys.exit(main())
