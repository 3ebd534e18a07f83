#!/usr/bin/env python
"""Print eval_results.json files side by side as one table.

    python tools/print_results.py "GMM=output/demo/eval_results.json" \
        "softmax (recorded)=benchmarks/recorded/mosaic_fcn_R18_softmax_seed0.json"
"""
import argparse
import warnings
import json
import os
import sys

warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gmmseg_d2.utils.results_table import format_results_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH",
                        help="a row label and the eval_results.json it shows")
    args = parser.parse_args()
    rows = {}
    for run in args.runs:
        label, sep, path = run.partition("=")
        if not sep:
            parser.error(f"expected LABEL=PATH, got {run!r}")
        if not os.path.isfile(path):
            parser.error(f"{path} does not exist (row {label!r})")
        with open(path) as f:
            rows[label] = json.load(f)
    print(format_results_table(rows))


if __name__ == "__main__":
    main()
