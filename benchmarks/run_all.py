"""Run every benchmark module and write JSON into benchmarks/results/ (make bench).

Each module exposes ``main(argv)``; arguments after ``--`` are passed to all of them
(e.g. ``python -m benchmarks.run_all -- --small`` to check the scripts on a CPU).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

import torch

MODULES = ["benchmarks.bench_geometry", "benchmarks.bench_generator", "benchmarks.bench_stage1",
           "benchmarks.bench_canonicalize", "benchmarks.bench_generate", "benchmarks.bench_triplane",
           "benchmarks.floor"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = Path(__file__).parent / "results"
    failed = []
    for name in MODULES:
        short = name.rsplit(".", 1)[-1]
        try:
            module = importlib.import_module(name)
            module.main(["--device", device, "--out", str(out_dir / f"{short}-{device}.json"), *extra])
        except Exception:  # report and go on: one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
