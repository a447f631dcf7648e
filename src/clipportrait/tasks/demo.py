"""task=demo — the chain that exists so far, end to end, on the embedded synthetic default.

Stages (each writes ``<out_dir>/<stage>/result.json`` when it finishes; a rerun skips finished
stages whose inputs are unchanged, ``task.force=true`` redoes them all). A stage's inputs are the config
keys of ``STAGE_INPUTS`` and the stages it reads (``STAGE_AFTER``): their fingerprint is stored in its
result, and a stage whose fingerprint differs (a changed key, or an upstream stage redone) runs again,
and so does everything after it.

1. data       render the synthetic portrait world (skipped when the dataset is already there)
2. check      validate it (check_data); problems stop the demo with their list
3. geometry   overlay each image's morphable mesh + landmarks under its camera, and the
              world-coordinate mesh render that conditions the discriminator (eq. 12)
4. lvlm       train the small CLIP of the synthetic world on the captions (task=train_lvlm)
5. stage1     train the Stage-1 deformable 3D GAN (task=train_stage1) for ``stage1_steps`` steps:
              FID/KID before and after (`evaluation` group, quick protocol), the fixed-seed sample
              grid, renders + depth of the EMA generator, and the checkpoint later stages start from
6. canonicalize  the Stage-2 cache: each image's canonical render (eq. 10) embedded with the small
              CLIP (task=canonicalize). By default the synthetic world's exact canonical re-render
              (``canonical_embed=oracle``); ``canonical_embed=canonical`` inverts into Stage 1 (eq. 9)
7. stage2     train Stage 2 (task=train_stage2) for ``stage2_steps`` steps: FID/KID before and
              after, then CLIP score, diversity, text-control and geometry accuracy at alpha 0 and 1
              for colour prompts (metrics.stage2)
8. generate   task=generate for ``prompts``: grids (neutral, smile), depth, alpha sweeps, turntable

``index.md`` in ``out_dir`` shows the images and numbers of every stage.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .base import RunContext, TaskConfig

DESCRIPTION = "the whole chain that exists so far on the synthetic default; writes an index page"


@dataclass
class Schema(TaskConfig):
    name: str = "demo"
    out_dir: str = "${paths.output_dir}/demo"
    preview_samples: int = 8
    overlay_size: int = 256  # images are upscaled to this size before the mesh is drawn on them
    stage1_steps: int = 100  # Stage-1 training steps (batch data.batch_size); ~7 min on 2 CPU cores
    stage1_grid_every_steps: int = 50
    lvlm_steps: int = 0  # small-LVLM training steps (0: train_lvlm's default)
    # Canonicalisation: "oracle" re-renders each synthetic item canonically (what a perfect inversion gives;
    # seconds for the whole set), "canonical" inverts into Stage 1 (eq. 9-10; on 2 CPU cores about a second
    # per image per step with the deformation), "raw" embeds the posed images (the Fig. 4 ablation).
    canonical_embed: str = "oracle"
    inversion_steps: int = 30  # for canonical_embed=canonical: LPIPS inversion steps per image (paper scale: 200+)
    inversion_batch: int = 32
    prompts: list[str] = field(default_factory=lambda: [
        "a photo of a person with short red hair", "a photo of a person with short blonde hair",
        "a photo of a person with short black hair and blue eyes", "a photo of a person with dark skin"])
    stage2_steps: int = 50  # Stage-2 training steps (batch data.batch_size); ~5 min on 2 CPU cores
    stage2_train: str = "all"  # all | alignment (see task=train_stage2)
    # Stage-2 text metrics: the first N colours of each attribute's vocabulary as prompts, M samples each
    text_eval_values: int = 4
    text_eval_samples: int = 6
    force: bool = False


STAGES = ("data", "check", "geometry", "lvlm", "stage1", "canonicalize", "stage2", "generate")
# The config keys each stage's result depends on ...
STAGE_INPUTS = {
    "data": ("data.synthetic", "data.path", "morphable"),
    "check": (),
    "geometry": ("morphable", "task.preview_samples", "task.overlay_size"),
    "lvlm": ("lvlm", "task.lvlm_steps", "seed"),
    "stage1": ("data", "morphable", "backbone", "discriminator", "deformation", "regularizer", "evaluation", "seed",
               "task.stage1_steps", "task.stage1_grid_every_steps"),
    "canonicalize": ("task.canonical_embed", "task.inversion_steps", "task.inversion_batch"),
    "stage2": ("regularizer", "evaluation", "seed", "task.stage2_steps", "task.stage2_train", "task.text_eval_values",
               "task.text_eval_samples"),
    "generate": ("task.prompts",),
}
# The regularizer group's Stage-2 fields: Stage 1 does not read them.
STAGE2_REGULARIZERS = ("jacobian_weight", "jacobian_sigma", "jacobian_samples", "jacobian_estimator", "norm_weight",
                       "alpha_drop")
# ... and the stages whose outputs it reads.
STAGE_AFTER = {
    "data": (), "check": ("data",), "geometry": ("data",), "lvlm": ("data",), "stage1": ("data",),
    "canonicalize": ("data", "lvlm", "stage1"), "stage2": ("data", "lvlm", "stage1", "canonicalize"),
    "generate": ("data", "lvlm", "stage2"),
}


def _config_value(cfg, key: str):
    """The plain (JSON-able) value at a dotted config ``key``."""
    import dataclasses

    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return value


def stage_fingerprint(cfg, name: str, upstream: dict[str, str]) -> str:
    """sha256 of stage ``name``'s config inputs and of the fingerprints of the stages it reads."""
    import hashlib

    inputs = {key: _config_value(cfg, key) for key in STAGE_INPUTS[name]}
    if name == "stage1":
        inputs["regularizer"] = {k: v for k, v in inputs["regularizer"].items() if k not in STAGE2_REGULARIZERS}
    payload = json.dumps({"inputs": inputs, "after": {u: upstream.get(u) for u in STAGE_AFTER[name]}},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


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
        fingerprint = stage_fingerprint(self.cfg, name, {k: v.get("fingerprint") for k, v in self.results.items()})
        if done.exists():
            earlier = json.loads(done.read_text())
            if earlier.get("fingerprint") == fingerprint and not self.cfg.task.force:
                self.results[name] = earlier
                console.print(f"[dim]demo: {name}: done earlier, skipped ({done})[/dim]")
                return
            if not self.cfg.task.force:
                console.print(f"[yellow]demo: {name}: its settings or an earlier stage changed since {done}; "
                              "running it again[/yellow]")
            # A finished stage's outputs (logs, curves, caches) belong to its old inputs: start it afresh
            # (but never delete a dataset that data.path put inside the stage's folder).
            if folder.resolve() in Path(self.cfg.data.path).resolve().parents:
                done.unlink()
            else:
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        console.print(f"[bold]demo: {name}[/bold]")
        start = time.time()
        result = fn(folder)
        result["seconds"] = round(time.time() - start, 2)
        result["fingerprint"] = fingerprint
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

    def _variant(self):
        """A copy of the demo's config for one stage, on the demo dataset."""
        import copy

        cfg = copy.deepcopy(self.cfg)
        cfg.data.path = self.dataset_path
        cfg.data.kind = "folder"
        return cfg

    def _lvlm_config(self):
        import dataclasses

        lvlm = self.results.get("lvlm")
        if lvlm is None:
            return self.cfg.lvlm
        return dataclasses.replace(self.cfg.lvlm, kind="project", weights=lvlm["checkpoint"])

    def _train_gan(self, folder: Path, cfg, task_module) -> tuple[dict, list[dict], list[str]]:
        """Run a GAN training task into ``folder/run`` with FID/KID before and after; copy its last grid."""
        import dataclasses

        cfg.evaluation = dataclasses.replace(cfg.evaluation, at_start=True, at_end=True)
        run_ctx = RunContext(run_dir=folder / "run")
        result = task_module.run(cfg, run_ctx)
        evaluations = [r for r in run_ctx.metrics.read() if r.get("event") == "evaluation"]
        grids = sorted(run_ctx.samples.glob("grid-*.png"))
        images = []
        if grids:
            (folder / "grid.png").write_bytes(grids[-1].read_bytes())
            images.append("grid.png")
        return result, evaluations, images

    @staticmethod
    def _curves(result: dict, evaluations: list[dict]) -> dict:
        return {"steps": result["steps"], "kimg": result["kimg"], "checkpoint": result["checkpoint"],
                "fid_curve": [[r["step"], round(r["fid"], 2)] for r in evaluations],
                "kid_curve": [[r["step"], round(r["kid"], 4)] for r in evaluations],
                "protocol": evaluations[-1]["protocol"] if evaluations else None}

    def _renders(self, system, folder: Path, name: str, extra: dict | None = None) -> float:
        """Images next to their depth maps for dataset conditioning (+ ``extra``); returns mean alpha."""
        import torch
        import torch.nn.functional as F

        from ..data.datamodule import ConditioningSampler

        cond = ConditioningSampler(self._dataset(), seed=1).sample(self.cfg.task.preview_samples)
        cond.update(extra or {})
        z = torch.randn(len(cond["camera"]), system.cfg.backbone.z_dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = system.generate(z, cond, G=system.G_ema, noise_mode="const")
        res = out["image"].shape[-1]
        depth = F.interpolate(out["image_depth"], size=(res, res), mode="nearest")
        d_lo, d_hi = float(depth.min()), float(depth.max())
        cells = [_tile([_uint8(img), _uint8(d, d_hi, d_lo)], 2) for img, d in zip(out["image"], depth)]
        _save_png(folder / name, _tile(cells, 4))
        return float(out["image_alpha"].mean())

    def stage1(self, folder: Path) -> dict:
        from ..systems.stage1 import Stage1GAN
        from . import train_stage1

        t = self.cfg.task
        cfg = self._variant()
        cfg.trainer.max_steps = t.stage1_steps
        cfg.task = train_stage1.Schema(checkpoint_every_kimg=0, grid_every_steps=t.stage1_grid_every_steps)
        result, evaluations, images = self._train_gan(folder, cfg, train_stage1)
        system = Stage1GAN.from_checkpoint(result["checkpoint"]).eval()
        alpha = self._renders(system, folder, "renders.png")
        return {"images": images + ["renders.png"], **self._curves(result, evaluations),
                "deformation": bool(self.cfg.deformation.enabled), "alpha_mean": round(alpha, 4)}

    def lvlm(self, folder: Path) -> dict:
        """The small CLIP of the synthetic world, trained on the demo's captions (task=train_lvlm)."""
        from . import train_lvlm

        t = self.cfg.task
        cfg = self._variant()
        schema = train_lvlm.Schema(data_path=self.dataset_path, out=str(folder / f"{self.cfg.lvlm.arch}.pt"))
        if t.lvlm_steps > 0:
            schema.steps = t.lvlm_steps
        cfg.task = schema
        result = train_lvlm.run(cfg, RunContext(run_dir=folder / "run"))
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}

    def canonicalize(self, folder: Path) -> dict:
        """Invert every image into the Stage-1 generator, re-render it canonically, embed it (eq. 9-10)."""
        import dataclasses

        from ..canonical.config import InversionConfig
        from . import canonicalize

        t = self.cfg.task
        cfg = self._variant()
        cfg.lvlm = self._lvlm_config()
        cfg.task = canonicalize.Schema(checkpoint=self.results["stage1"]["checkpoint"], embed=t.canonical_embed,
                                       data_path=self.dataset_path, out=str(folder / "cache"),
                                       batch_size=t.inversion_batch, render_size=32, overwrite=True,
                                       inversion=dataclasses.replace(InversionConfig(), steps=t.inversion_steps,
                                                                     w_avg_samples=2000))
        result = canonicalize.run(cfg, RunContext(run_dir=folder / "run"))
        images = []
        for name in ("worst.png", "best.png", "lpips_histogram.png"):
            source = folder / "cache" / "report" / name
            if source.exists():
                images.append(f"cache/report/{name}")
        keep = ("cache", "embed", "lvlm_model_id", "lpips_mean", "lpips_median", "lpips_p90", "lpips_max")
        return {"images": images, "num_images": result["images"], **{k: result[k] for k in keep if k in result}}

    def stage2(self, folder: Path) -> dict:
        """Text conditioning (task=train_stage2) from the Stage-1 checkpoint and the canonical cache."""
        from ..systems.stage2 import Stage2GAN
        from . import train_stage2

        t = self.cfg.task
        cfg = self._variant()
        cfg.lvlm = self._lvlm_config()
        cfg.data.clip_cache = self.results["canonicalize"]["cache"]
        cfg.trainer.max_steps = t.stage2_steps
        cfg.task = train_stage2.Schema(stage1=self.results["stage1"]["checkpoint"], train=t.stage2_train,
                                       checkpoint_every_kimg=0, grid_every_steps=0)
        result, evaluations, images = self._train_gan(folder, cfg, train_stage2)
        system = Stage2GAN.from_checkpoint(result["checkpoint"]).eval()
        self._renders(system, folder, "renders_unconditional.png", {"alpha": 0.0})
        text = self._text_metrics(system, cfg, folder)
        return {"images": images + ["renders_unconditional.png", "prompts_alpha1.png"],
                **self._curves(result, evaluations), "train": t.stage2_train, **text}

    def generate(self, folder: Path) -> dict:
        """Text-to-portrait with the Stage-2 checkpoint (task=generate): prompts x seeds for a neutral
        and a smiling face, the alpha sweep, depth maps and a turntable video."""
        import shutil

        from . import generate

        t = self.cfg.task
        images, outputs = [], {}
        for expression in ("neutral", "smile"):
            cfg = self._variant()
            cfg.lvlm = self._lvlm_config()
            cfg.task = generate.Schema(checkpoint=self.results["stage2"]["checkpoint"], prompts=list(t.prompts),
                                       seeds=[0, 1, 2, 3], expression=expression, camera="three_quarter_left",
                                       turntable=expression == "neutral", turntable_frames=12, truncation_psi=0.7,
                                       alpha_sweep=[0.0, 0.5, 1.0] if expression == "neutral" else [1.0])
            result = generate.run(cfg, RunContext(run_dir=folder / expression))
            for key in ("grid", "depth"):
                source = Path(result[key])
                if source.exists():
                    name = f"{expression}_{source.name}"
                    shutil.copyfile(source, folder / name)
                    images.append(name)
            for k, strip in enumerate(result.get("alpha_sweep", [])[:2] if expression == "neutral" else []):
                name = f"alpha_sweep_{k}.png"
                shutil.copyfile(strip, folder / name)
                images.append(name)
            outputs[expression] = {"latency_ms": result["latency_ms"], "turntable": result.get("turntable", [])}
        return {"images": images, "prompts": list(t.prompts), "outputs": outputs}

    def _text_metrics(self, system, cfg, folder: Path) -> dict:
        """CLIP score, diversity, text-control and geometry accuracy at alpha = 0 and 1 (metrics.stage2),
        with colour probes calibrated on the demo's real images; a grid of the alpha = 1 prompts."""
        from ..data.datamodule import PortraitDataset
        from ..lvlm import build_clip
        from ..metrics.control import ColorProbe
        from ..metrics.lpips import build_lpips
        from ..metrics.stage2 import TextEvalConfig, evaluate_text_control

        dataset = PortraitDataset(self.dataset_path, flip=False, clip_cache=cfg.data.clip_cache)
        clip = build_clip(cfg.lvlm)
        settings = TextEvalConfig(values_per_attribute=self.cfg.task.text_eval_values,
                                  samples_per_prompt=self.cfg.task.text_eval_samples)
        probes, unavailable = {}, {}
        for attribute in settings.attributes:
            try:
                probes[attribute] = ColorProbe.fit(self.dataset_path, attribute, morphable=system.geometry.morphable)
            except ValueError as err:  # e.g. too few images show the region (tiny datasets)
                unavailable[attribute] = str(err)
        lpips = build_lpips("alex")
        out: dict = {"probe_ceiling": {a: round(p.heldout_accuracy, 3) for a, p in probes.items()},
                     "probe_unavailable": unavailable}
        for alpha in (0.0, 1.0):
            settings.alpha = alpha
            r = evaluate_text_control(system, clip, dataset, settings, lpips=lpips, probes=probes)
            out[f"alpha{alpha:g}"] = {
                "clip_score": round(r["clip_score"], 3), "diversity_lpips": round(r["diversity_lpips"], 4),
                "silhouette_iou": round(r["silhouette_iou"], 4),
                "text_control_accuracy": round(r.get("text_control_accuracy", float("nan")), 4),
                "per_attribute_accuracy": {a: round(v.get("accuracy", float("nan")), 3)
                                           for a, v in r["per_attribute"].items()}}
            if alpha == 1.0:
                rows = [_tile([_uint8(img) for img in prompt_images], len(prompt_images)) for prompt_images in r["images"]]
                _save_png(folder / "prompts_alpha1.png", _tile(rows, 1))
                out["prompts"] = r["prompts"]
                out["text_protocol"] = r["protocol"]
        return out

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
        path = self.out / "index.md"
        with atomic_open(path, "w") as f:
            f.write("\n".join(lines))
        return path


def run(cfg, ctx: RunContext) -> dict:
    from ..utils.console import console

    from ..metrics.stage2 import TextEvalConfig

    t = cfg.task
    try:  # checked before hours of training, not after
        TextEvalConfig(values_per_attribute=t.text_eval_values, samples_per_prompt=t.text_eval_samples).validate()
    except ValueError as err:
        raise UserError(f"task.text_eval_samples={t.text_eval_samples}, task.text_eval_values={t.text_eval_values}: "
                        f"{err}") from None
    demo = Demo(cfg, ctx)
    for name in STAGES:
        demo.stage(name, getattr(demo, name))
    index = demo.index()
    console.print(f"[green]demo finished[/green]: stages {', '.join(demo.results)}; see {index}")
    return {"index": str(index), "stages": len(demo.results)}
