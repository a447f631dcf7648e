"""The executed notebooks of ``notebooks/``: run one in place, and check that one was run cleanly.

    python -m clipportrait.utils.notebooks notebooks/demo.ipynb     # make notebook (needs requirements-notebook.txt)

Executing needs nbclient, nbformat and ipykernel (``requirements-notebook.txt``); checking reads the
JSON only, so the test suite needs none of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .files import atomic_open


def check_executed(path: str | Path) -> dict:
    """Problems of notebook ``path`` as a list under "problems" (empty: it ran top to bottom in one
    kernel, every code cell has an execution count in order, no cell raised), with the counts of
    code cells and image outputs."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return {"problems": [f"{path}: not a readable notebook ({err})"], "code_cells": 0, "images": 0}
    problems = []
    if nb.get("nbformat") != 4:
        problems.append(f"{path}: nbformat {nb.get('nbformat')!r}, expected 4")
    cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code" and "".join(c.get("source", "")).strip()]
    images = 0
    for k, cell in enumerate(cells, start=1):
        if cell.get("execution_count") != k:
            problems.append(f"{path}: code cell {k} has execution count {cell.get('execution_count')!r}, expected {k} "
                            "(not run, or not run in order)")
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"{path}: code cell {k} raised {out.get('ename')}: {out.get('evalue')}")
            images += sum(1 for mime in out.get("data", {}) if mime.startswith("image/"))
    return {"problems": problems, "code_cells": len(cells), "images": images}


def execute(path: str | Path, timeout: int = 1800) -> None:
    """Run notebook ``path`` top to bottom in a fresh kernel with its folder as working directory and
    write it back with its outputs (atomically: a failed run leaves the old file)."""
    try:
        import nbclient
        import nbformat
    except ImportError as err:
        raise SystemExit(f"executing notebooks needs {err.name}: pip install -r requirements-notebook.txt") from err
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent.resolve())}})
    client.execute()
    with atomic_open(path, "w") as f:
        nbformat.write(nb, f)
    report = check_executed(path)
    if report["problems"]:
        raise SystemExit("\n".join(report["problems"]))
    print(f"{path}: {report['code_cells']} code cells run, {report['images']} images")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m clipportrait.utils.notebooks NOTEBOOK.ipynb [...]")
    for name in sys.argv[1:]:
        execute(name)
