"""`python -m rlhf_ray.bench [--quick] [--out DIR] [--only GROUP]`: the same as `rlhf-ray bench`."""

import sys

from rlhf_ray.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
