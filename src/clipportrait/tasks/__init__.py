"""One module per `task=` value. Each module defines ``Schema`` (a TaskConfig subclass),
``DESCRIPTION`` (one line for --help) and ``run(cfg, ctx) -> dict``.

Modules are imported only when their task runs, except for their schema, so keep module-level
imports light (heavy imports go inside ``run``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# task name -> module; the order is the order shown by `python run.py --help`.
TASKS: dict[str, str] = {
    "demo": "clipportrait.tasks.demo",
    "make_synthetic": "clipportrait.tasks.make_synthetic",
    "check_data": "clipportrait.tasks.check_data",
    "train_stage1": "clipportrait.tasks.train_stage1",
    "evaluate": "clipportrait.tasks.evaluate",
    "canonicalize": "clipportrait.tasks.canonicalize",
    "train_lvlm": "clipportrait.tasks.train_lvlm",
    "train_stage2": "clipportrait.tasks.train_stage2",
    "generate": "clipportrait.tasks.generate",
    "export": "clipportrait.tasks.export",
    "info": "clipportrait.tasks.info",
}


def load_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])
