"""task=check_data — validate a dataset and report every problem at once, with file names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import RunContext, TaskConfig

DESCRIPTION = "validate a dataset (images, labels, morphable params, masks); lists every problem"


@dataclass
class Schema(TaskConfig):
    name: str = "check_data"
    path: str = "${data.path}"
    resolution: Optional[int] = None  # expected image size; default: the first image's


def run(cfg, ctx: RunContext) -> dict:
    from ..data.format import check_dataset
    from ..errors import UserError
    from ..utils.console import console
    from ..utils.files import write_json_atomic

    problems = check_dataset(cfg.task.path, cfg.task.resolution)
    report = ctx.run_dir / "problems.json"
    write_json_atomic(report, [{"file": p.file, "message": p.message, "name": p.name} for p in problems])
    ctx.metrics.write({"event": "check_data", "path": cfg.task.path, "problems": len(problems)})
    if not problems:
        console.print(f"[green]ok[/green]: {cfg.task.path} has no problems")
        return {"problems": 0}
    for p in problems:
        console.print(f"[red]problem[/red] {p}")
    shown = "; ".join(str(p) for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise UserError(f"{cfg.task.path}: {len(problems)} problem(s): {shown}{more}. Full list: {report}. "
                    f"Fix them, or train with data.skip_bad=true to skip the affected images.")
