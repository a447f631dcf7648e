#!/usr/bin/env python
"""clipportrait's single entry point: python run.py task=<name> [overrides]   (--help lists tasks)."""

import sys

from clipportrait.cli import main

if __name__ == "__main__":
    sys.exit(main())
