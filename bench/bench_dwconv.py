#!/usr/bin/env python
"""Depthwise conv2d: fastvis vs PyTorch eager and torch.compile, measured in the same run.

The same as ``fastvis bench dwconv [options]`` (see bench/README.md and ``--help``), for
running from a source checkout:

    python bench/bench_dwconv.py --quick
    python bench/bench_dwconv.py --json bench/results/dwconv.json

Uses the installed fastvis, or else the in-tree dev build under python/.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("fastvis") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                    "python"))

from fastvis.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "dwconv", *sys.argv[1:]]))
