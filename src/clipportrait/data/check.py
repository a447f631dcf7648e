"""Command line: check a dataset folder or zip and list every problem.

    python -m clipportrait.data.check PATH [--resolution R] [--headers-only]

Exit status 0 when the dataset is usable, 1 when problems were found (one line each, naming the file).
"""

from __future__ import annotations

import argparse
import sys

from .format import check_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipportrait.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="dataset folder or uncompressed zip")
    parser.add_argument("--resolution", type=int, default=None, help="expected image size (square)")
    parser.add_argument("--headers-only", action="store_true", help="do not decode pixels (faster)")
    args = parser.parse_args(argv)
    problems = check_dataset(args.path, resolution=args.resolution, decode=not args.headers_only)
    for problem in problems:
        print(problem)
    print(f"{args.path}: {len(problems)} problem(s)" if problems else f"{args.path}: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
