"""`python -m rlhf_ray.bench [--quick] [--out DIR] [--only GROUP]`: the same as `rlhf-ray bench`."""

import argparse
import sys

from rlhf_ray.bench.main import FIGURES, bench_main

parser = argparse.ArgumentParser(prog="python -m rlhf_ray.bench", description=__doc__)
parser.add_argument("--out", default="bench", help="results folder (default: bench)")
parser.add_argument("--quick", action="store_true", help="the tiny model, a few steps: checks the pipeline only")
parser.add_argument("--only", action="append", choices=list(FIGURES), default=None,
                    help="run only this group of figures (repeatable; default: all)")
args = parser.parse_args()
sys.exit(bench_main(args.out, quick=args.quick, only=args.only))
