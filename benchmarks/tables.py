"""Markdown tables from the benchmarks' JSON (one run per table, with its command, date and commit).

    python benchmarks/tables.py bench_out/bench_generate.json [--update docs/benchmarks.md README.md]

The code lives in `fusec/benchtables.py`.
"""
import sys

from fusec.benchtables import main

if __name__ == "__main__":
    sys.exit(main())
