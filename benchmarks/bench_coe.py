"""Composition of Experts: many experts behind a router, an HBM budget, a Zipf stream of requests, against
building a fresh PyTorch model per request.

    python benchmarks/bench_coe.py [--experts 150] [--hbm-experts 20] [--requests 200] [--tokens 64]

The same benchmark is `fusec coe bench`; the code lives in `fusec/coe/bench.py`.
"""
import sys

from fusec.coe.bench import main

if __name__ == "__main__":
    sys.exit(main())
