"""notebooks/ (DESIGN.md's layout: executed demo notebooks): every shipped notebook ran top to bottom
without an error and shows its figures; the check itself names unrun and failed cells."""

from __future__ import annotations

import json
from pathlib import Path

from clipportrait.utils.notebooks import check_executed

REPO = Path(__file__).resolve().parents[1]


def test_shipped_notebooks_were_executed_cleanly():
    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    assert notebooks, "notebooks/ holds no notebook"
    for path in notebooks:
        report = check_executed(path)
        assert not report["problems"], report["problems"]
        assert report["code_cells"] >= 5 and report["images"] >= 3, (path.name, report)


def _cell(source: str, count, outputs=()):
    return {"cell_type": "code", "source": source, "execution_count": count, "outputs": list(outputs), "metadata": {}}


def test_check_names_unrun_out_of_order_and_failed_cells(tmp_path):
    image = {"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": "<Image>"}, "metadata": {}}
    error = {"output_type": "error", "ename": "FileNotFoundError", "evalue": "outputs/demo", "traceback": []}
    cells = [_cell("x = 1", 1, [image]), {"cell_type": "markdown", "source": "text", "metadata": {}},
             _cell("y = 2", None), _cell("z = 3", 2, [error]), _cell("   ", None)]
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}))
    report = check_executed(path)
    assert report["code_cells"] == 3 and report["images"] == 1  # the blank cell does not count
    problems = "\n".join(report["problems"])
    assert "code cell 2 has execution count None" in problems
    assert "code cell 3 has execution count 2" in problems
    assert "code cell 3 raised FileNotFoundError: outputs/demo" in problems
    path.write_text("{not json")
    assert "not a readable notebook" in check_executed(path)["problems"][0]
