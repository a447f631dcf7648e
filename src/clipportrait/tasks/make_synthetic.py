"""task=make_synthetic — render the synthetic portrait world (DESIGN.md section 5) into a dataset."""

from __future__ import annotations

from dataclasses import dataclass

from .base import RunContext, TaskConfig

DESCRIPTION = "render synthetic portraits of the procedural head (+ captions, masks, ground truth)"


@dataclass
class Schema(TaskConfig):
    name: str = "make_synthetic"
    out: str = "${data.path}"  # dataset folder (".zip" appended when data.synthetic.as_zip)


def dataset_bytes(path) -> int:
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(cfg, ctx: RunContext) -> dict:
    import time

    from ..data.synthetic import generate_synthetic
    from ..geometry.morphable import build_morphable
    from ..utils.console import console

    start = time.time()
    # The configured head, so the stored parameters belong to the model that training will use.
    out = generate_synthetic(cfg.data.synthetic, cfg.task.out, model=build_morphable(cfg.morphable))
    seconds = time.time() - start
    size = dataset_bytes(out)
    console.print(f"dataset: {out} ({cfg.data.synthetic.num_images} images at "
                  f"{cfg.data.synthetic.resolution}², {size / 2**20:.1f} MiB) in {seconds:.1f} s")
    ctx.metrics.write({"event": "make_synthetic", "path": str(out), "num_images": cfg.data.synthetic.num_images,
                       "resolution": cfg.data.synthetic.resolution, "seconds": round(seconds, 2), "bytes": size})
    return {"path": str(out), "seconds": seconds, "bytes": size}
