"""task=demo — the chain that exists so far, end to end, on the embedded synthetic default.

Stages (each writes ``<out_dir>/<stage>/result.json`` when it finishes; a rerun skips finished
stages, ``task.force=true`` redoes them):

1. data       render the synthetic portrait world (skipped when the dataset is already there)
2. check      validate it (check_data); problems stop the demo with their list
3. geometry   overlay each image's morphable mesh + landmarks under its camera, and the
              world-coordinate mesh render that conditions the discriminator (eq. 12)
4. stage1     train the Stage-1 deformable 3D GAN (task=train_stage1) for ``stage1_steps`` steps:
              FID/KID before and after (`evaluation` group, quick protocol), the fixed-seed sample
              grid, renders + depth of the EMA generator, and the checkpoint later stages start from

``index.md`` in ``out_dir`` shows the images and numbers and says what is not built yet.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import RunContext, TaskConfig

DESCRIPTION = "the whole chain that exists so far on the synthetic default; writes an index page"

NOT_YET = [
    "small LVLM and canonicalisation as demo stages (the tasks exist: task=train_lvlm, task=canonicalize)",
    "Stage-2 text conditioning (task=train_stage2) and text-to-portrait generation (task=generate)",
]


@dataclass
class Schema(TaskConfig):
    name: str = "demo"
    out_dir: str = "${paths.output_dir}/demo"
    preview_samples: int = 8
    overlay_size: int = 256  # images are upscaled to this size before the mesh is drawn on them
    stage1_steps: int = 120  # Stage-1 training steps (batch data.batch_size); ~8 min on 2 CPU cores
    stage1_grid_every_steps: int = 50
    force: bool = False


def _tile(images, columns: int):
    """Tile equally sized HxWx3 uint8 arrays row by row."""
    import numpy as np

    rows = [np.concatenate(images[i:i + columns], axis=1) for i in range(0, len(images), columns)]
    if len(rows) > 1 and rows[-1].shape != rows[0].shape:
        pad = np.zeros((rows[0].shape[0], rows[0].shape[1] - rows[-1].shape[1], 3), np.uint8)
        rows[-1] = np.concatenate([rows[-1], pad], axis=1)
    return np.concatenate(rows, axis=0)


def _uint8(x, lo: float = -1.0, hi: float = 1.0):
    """(C,H,W) tensor in [lo, hi] -> HxWx3 uint8 (one channel repeated)."""
    import numpy as np

    x = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x[:3].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _save_png(path: Path, array) -> None:
    from PIL import Image

    from ..utils.files import atomic_open

    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


class Demo:
    def __init__(self, cfg, ctx: RunContext):
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.task.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict] = {}

    # -- shared objects, built lazily -------------------------------------------------------
    def _dataset(self):
        from ..data.datamodule import PortraitDataset

        return PortraitDataset(self.dataset_path, flip=False)

    def _morphable(self):
        from ..geometry.morphable import build_morphable

        if not hasattr(self, "_model"):
            self._model = build_morphable(self.cfg.morphable)
        return self._model

    @property
    def dataset_path(self) -> str:
        return self.results["data"]["path"]

    # -- stages ------------------------------------------------------------------------------
    def stage(self, name: str, fn: Callable[[Path], dict]) -> None:
        from ..utils.console import console
        from ..utils.files import write_json_atomic

        folder = self.out / name
        done = folder / "result.json"
        if done.exists() and not self.cfg.task.force:
            self.results[name] = json.loads(done.read_text())
            console.print(f"[dim]demo: {name}: done earlier, skipped ({done})[/dim]")
            return
        folder.mkdir(parents=True, exist_ok=True)
        console.print(f"[bold]demo: {name}[/bold]")
        start = time.time()
        result = fn(folder)
        result["seconds"] = round(time.time() - start, 2)
        write_json_atomic(done, result)
        self.results[name] = result
        self.ctx.metrics.write({"event": f"demo/{name}", **{k: v for k, v in result.items() if not isinstance(v, (dict, list))}})

    def data(self, folder: Path) -> dict:
        from ..data.synthetic import generate_synthetic
        from .make_synthetic import dataset_bytes

        path = generate_synthetic(self.cfg.data.synthetic, self.cfg.data.path, model=self._morphable())
        sheet = Path(path) / "contact_sheet.png"
        if sheet.exists():
            (folder / "contact_sheet.png").write_bytes(sheet.read_bytes())
        return {"path": str(path), "num_images": self.cfg.data.synthetic.num_images,
                "resolution": self.cfg.data.synthetic.resolution, "bytes": dataset_bytes(path),
                "images": ["contact_sheet.png"] if sheet.exists() else []}

    def check(self, folder: Path) -> dict:
        from ..data.format import check_dataset
        from ..errors import UserError

        problems = check_dataset(self.dataset_path)
        if problems:
            raise UserError(f"the demo dataset {self.dataset_path} has {len(problems)} problem(s), e.g. "
                            f"{problems[0]}; run task=check_data for the list")
        return {"problems": 0}

    def geometry(self, folder: Path) -> dict:
        import torch

        from ..data.datamodule import observation_vertices
        from ..geometry.mesh_render import render_vertex_coords
        from ..geometry.overlay import draw_overlay

        dataset, model = self._dataset(), self._morphable()
        items = [dataset[i] for i in range(min(8, len(dataset)))]
        batch = {k: torch.stack([it[k] for it in items]) for k in ("camera", "shape", "expression", "pose", "flip")}
        with torch.no_grad():
            verts = observation_vertices(batch, model)
            landmarks = model.landmarks(verts)
            rdr = render_vertex_coords(verts, model.faces, batch["camera"], items[0]["image"].shape[-1])
        size = self.cfg.task.overlay_size
        big = torch.nn.functional.interpolate(torch.stack([it["image"] for it in items]), size=(size, size),
                                              mode="bilinear", align_corners=False)
        overlays = [draw_overlay(img, model.simplify(v[None])[0], model.simplified_faces, c, landmarks=lm)
                    for img, v, c, lm in zip(big, verts, batch["camera"], landmarks)]
        _save_png(folder / "overlays.png", _tile(overlays, 4))
        lo, hi = float(verts.min()), float(verts.max())
        _save_png(folder / "mesh_renders.png", _tile([_uint8(r[:3], lo, hi) for r in rdr], 4))
        coverage = float(rdr[:, 3].mean())
        return {"images": ["overlays.png", "mesh_renders.png"], "mesh_coverage": round(coverage, 4),
                "vertices": model.num_vertices, "faces": int(model.faces.shape[0]),
                "simplified_faces": int(model.simplified_faces.shape[0])}

    def stage1(self, folder: Path) -> dict:
        import copy
        import dataclasses

        import torch
        import torch.nn.functional as F

        from ..systems.stage1 import Stage1GAN
        from . import train_stage1

        t = self.cfg.task
        cfg = copy.deepcopy(self.cfg)  # the stage's own variant of the demo's config
        cfg.data.path = self.dataset_path
        cfg.data.kind = "folder"
        cfg.trainer.max_steps = t.stage1_steps
        cfg.evaluation = dataclasses.replace(cfg.evaluation, at_start=True, at_end=True)
        cfg.task = train_stage1.Schema(checkpoint_every_kimg=0, grid_every_steps=t.stage1_grid_every_steps)
        run_ctx = RunContext(run_dir=folder / "run")
        result = train_stage1.run(cfg, run_ctx)
        evaluations = [r for r in run_ctx.metrics.read() if r.get("event") == "evaluation"]
        grids = sorted((run_ctx.samples).glob("grid-*.png"))
        images = []
        if grids:
            (folder / "grid.png").write_bytes(grids[-1].read_bytes())
            images.append("grid.png")
        # Renders and depth of the trained EMA generator under dataset conditioning.
        system = Stage1GAN.from_checkpoint(result["checkpoint"]).eval()
        from ..data.datamodule import ConditioningSampler

        cond = ConditioningSampler(self._dataset(), seed=1).sample(t.preview_samples)
        z = torch.randn(len(cond["camera"]), system.cfg.backbone.z_dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = system.generate(z, cond, G=system.G_ema, noise_mode="const")
        res = out["image"].shape[-1]
        depth = F.interpolate(out["image_depth"], size=(res, res), mode="nearest")
        d_lo, d_hi = float(depth.min()), float(depth.max())
        cells = [_tile([_uint8(img), _uint8(d, d_hi, d_lo)], 2) for img, d in zip(out["image"], depth)]
        _save_png(folder / "renders.png", _tile(cells, 4))
        images.append("renders.png")
        return {
            "images": images, "steps": result["steps"], "kimg": result["kimg"], "checkpoint": result["checkpoint"],
            "fid_curve": [[r["step"], round(r["fid"], 2)] for r in evaluations],
            "kid_curve": [[r["step"], round(r["kid"], 4)] for r in evaluations],
            "protocol": evaluations[-1]["protocol"] if evaluations else None,
            "deformation": bool(self.cfg.deformation.enabled),
            "alpha_mean": round(float(out["image_alpha"].mean()), 4),
        }

    def index(self) -> Path:
        from ..utils.files import atomic_open

        lines = ["# clipportrait demo", "",
                 f"Ran {time.strftime('%Y-%m-%d %H:%M')} with `python run.py task=demo` (run dir `{self.ctx.run_dir}`).", ""]
        for name, result in self.results.items():
            lines += [f"## {name}", ""]
            for image in result.get("images", []):
                lines.append(f"![{name}]({name}/{image})")
            lines.append("")
            lines.append("```json")
            lines.append(json.dumps({k: v for k, v in result.items() if k != "images"}, indent=2))
            lines.append("```")
            lines.append("")
        lines += ["## Not built yet", ""] + [f"- {item}" for item in NOT_YET] + [""]
        path = self.out / "index.md"
        with atomic_open(path, "w") as f:
            f.write("\n".join(lines))
        return path


def run(cfg, ctx: RunContext) -> dict:
    from ..utils.console import console

    demo = Demo(cfg, ctx)
    for name in ("data", "check", "geometry", "stage1"):
        demo.stage(name, getattr(demo, name))
    index = demo.index()
    console.print(f"[green]demo finished[/green]: stages {', '.join(demo.results)}; see {index}")
    console.print("not built yet: " + "; ".join(NOT_YET))
    return {"index": str(index), "stages": len(demo.results)}
