"""`python -m rlhf_ray.bench [--quick] [--out DIR]`: the benchmark without the CLI."""

import argparse
import sys

from rlhf_ray.bench.main import bench_main

parser = argparse.ArgumentParser(prog="python -m rlhf_ray.bench", description="Run the rlhf_ray benchmark.")
parser.add_argument("--out", default="bench", help="folder for results.json, results.md and results.png")
parser.add_argument("--quick", action="store_true", help="tiny model and short runs (a couple of minutes)")
args = parser.parse_args()
sys.exit(bench_main(args.out, args.quick))
