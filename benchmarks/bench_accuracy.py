"""Accuracy of bf16 and int8 weights against fp32: greedy-token agreement and logit error (see fusec/accuracy.py).

    python benchmarks/bench_accuracy.py [stories15M ...] [--steps 64] [--weights bf16 int8]
"""
import sys

from fusec.accuracy import main

if __name__ == "__main__":
    sys.exit(main())
