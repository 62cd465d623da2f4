"""A reward module that ends the process at import (must be reported, never exit 0 silently)."""
import sys

sys.exit(0)


def score(prompt, response, row):
    return 1.0
