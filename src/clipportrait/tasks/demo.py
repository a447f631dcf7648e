"""task=demo — the chain that exists so far, end to end, on the embedded synthetic default.

Stages (each writes ``<out_dir>/<stage>/result.json`` when it finishes; a rerun skips finished
stages, ``task.force=true`` redoes them):

1. data       render the synthetic portrait world (skipped when the dataset is already there)
2. check      validate it (check_data); problems stop the demo with their list
3. geometry   overlay each image's morphable mesh + landmarks under its camera, and the
              world-coordinate mesh render that conditions the discriminator (eq. 12)
4. generator  untrained deformable tri-plane generator: renders + depth with the surface-field
              deformation (eq. 4-5) driven by the dataset's morphable parameters
5. metrics    FID/KID (offline Inception) of those samples against the real images — the protocol
              and numbers go to metrics.jsonl (untrained, so the values are a baseline, not a result)

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
    "Stage-1 GAN training (task=train_stage1)",
    "canonicalisation + CLIP cache (task=canonicalize), small LVLM (task=train_lvlm)",
    "Stage-2 text conditioning (task=train_stage2) and text-to-portrait generation (task=generate)",
]


@dataclass
class Schema(TaskConfig):
    name: str = "demo"
    out_dir: str = "${paths.output_dir}/demo"
    preview_samples: int = 8
    fid_samples: int = 32
    overlay_size: int = 256  # images are upscaled to this size before the mesh is drawn on them
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

    def _generator_samples(self, n: int, seed: int):
        """n untrained-generator renders with the surface-field deformation of sampled conditioning."""
        import torch

        from ..data.datamodule import ConditioningSampler, observation_vertices
        from ..geometry.deformation import SurfaceFieldDeformation
        from ..nn.config import build_generator

        torch.manual_seed(self.cfg.seed)
        G = build_generator(self.cfg.backbone).eval()
        model = self._morphable()
        deform = SurfaceFieldDeformation(model.simplified_faces, self.cfg.deformation)
        canon = model.simplify(model.canonical_vertices(1))
        cond = ConditioningSampler(self._dataset(), seed=seed).sample(n)
        z = torch.randn(n, self.cfg.backbone.z_dim, generator=torch.Generator().manual_seed(seed))
        outs = []
        with torch.no_grad():
            for i in range(0, n, 8):
                part = {k: v[i:i + 8] for k, v in cond.items()}
                obs = model.simplify(observation_vertices(part, model))

                def deformer(points, obs=obs):
                    return deform(points, obs, canon)

                outs.append(G(z[i:i + 8], part["camera"], deformer=deformer if self.cfg.deformation.enabled else None,
                              noise_mode="const"))
        return {k: torch.cat([o[k] for o in outs]) for k in ("image", "image_depth", "image_alpha")}

    def generator(self, folder: Path) -> dict:
        import torch
        import torch.nn.functional as F

        out = self._generator_samples(self.cfg.task.preview_samples, seed=1)
        for key, value in out.items():
            if not torch.isfinite(value).all():
                raise RuntimeError(f"generator preview: non-finite values in {key}")
        res = out["image"].shape[-1]
        depth = F.interpolate(out["image_depth"], size=(res, res), mode="nearest")
        d_lo, d_hi = float(depth.min()), float(depth.max())
        cells = [_tile([_uint8(img), _uint8(d, d_hi, d_lo)], 2) for img, d in zip(out["image"], depth)]
        _save_png(folder / "generator.png", _tile(cells, 4))
        alpha = out["image_alpha"].flatten(1).mean(1)
        return {"images": ["generator.png"], "samples": len(cells), "alpha_mean": round(float(alpha.mean()), 4),
                "alpha_min_per_image": round(float(alpha.min()), 4),
                "depth_range": [round(d_lo, 4), round(d_hi, 4)],
                "deformation": bool(self.cfg.deformation.enabled), "trained": False}

    def metrics(self, folder: Path) -> dict:
        import torch

        from ..assets.resolvers import ASSETS
        from ..metrics.fid import build_image_metric

        n = self.cfg.task.fid_samples
        dataset = self._dataset()
        real = torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))])
        fake = self._generator_samples(len(real), seed=2)["image"]
        fid = build_image_metric("fid", normalize=True)
        kid = build_image_metric("kid", normalize=True, subset_size=min(50, len(real)), subsets=10)
        for metric in (fid, kid):
            metric.update(((real + 1) / 2).clamp(0, 1), real=True)
            metric.update(((fake + 1) / 2).clamp(0, 1), real=False)
        kid_mean, kid_std = kid.compute()
        record = {
            "fid": round(float(fid.compute()), 3), "kid": round(float(kid_mean), 5), "kid_std": round(float(kid_std), 5),
            "protocol": {
                "real": f"first {len(real)} images of {self.dataset_path}", "fake": f"{len(fake)} samples",
                "conditioning": "camera + morphable parameters drawn from the dataset (ConditioningSampler)",
                "generator": "untrained (random init, seed cfg.seed)", "feature_extractor": "FID Inception TF 2015-12-05 (offline)",
                "feature_sha256": ASSETS["fid-inception"].sha256, "resize": "tf1 bilinear to 299", "kid_subset_size": min(50, len(real)),
            },
        }
        self.ctx.metrics.write({"event": "demo/fid_kid", **record})
        return record

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
    for name in ("data", "check", "geometry", "generator", "metrics"):
        demo.stage(name, getattr(demo, name))
    index = demo.index()
    console.print(f"[green]demo finished[/green]: stages {', '.join(demo.results)}; see {index}")
    console.print("not built yet: " + "; ".join(NOT_YET))
    return {"index": str(index), "stages": len(demo.results)}
