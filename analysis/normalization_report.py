#!/usr/bin/env python
"""Normalization report: train a small digits CNN under each kernel geometry and write a
Markdown report with figures (dimension, curvature, injectivity radius and diameter per
layer; angular step per unit learning rate; gradient norms; distances travelled; landscapes
and sharpness).  Same options as ``kernelgeo analyze``.

Example::

    python analysis/normalization_report.py --out results/normalization --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

from kernelgeo.analysis.report import add_analyze_arguments, main_analyze  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_analyze_arguments(parser)
    parser.set_defaults(out="results/normalization_report")
    return main_analyze(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
