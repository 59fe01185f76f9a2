#!/usr/bin/env python
"""Thin wrapper: `python scripts/bench.py [--quick] [--json OUT] …` = `refnet bench …`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from refnet.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
