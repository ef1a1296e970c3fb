"""Markdown tables from the benchmarks' JSON (one run per table, with its command, date and commit).

    python benchmarks/tables.py bench_out/bench_generate.json [--update docs/benchmarks.md README.md]
    python benchmarks/tables.py bench_out/bench_rdu.json --update docs/rdu-model.md

Every `<!-- table: NAME -->` block of the docs has a renderer; the code lives in `fusec/benchtables.py`.
"""
import sys

from fusec.benchtables import main

if __name__ == "__main__":
    sys.exit(main())
