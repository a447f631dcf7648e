"""task=generate — text- and 3D-controlled portraits from a Stage-2 checkpoint (paper sec. 2, 3.4).

    python run.py task=generate task.checkpoint=<stage-2 run>/checkpoints/last.ckpt \\
        "task.prompts=['a photo of a person with long red hair and green eyes']" lvlm=<the cache's LVLM>
    python run.py task=generate ... task.prompts_file=prompts.txt task.seeds=[0,1,2,3,4,5]
    python run.py task=generate ... task.camera=three_quarter_left task.expression=smile
    python run.py task=generate ... task.yaw=20 task.pitch=-10 task.expression=from_dataset
    python run.py task=generate ... task.alpha=0.5 "task.alpha_sweep=[0,0.5,1,1.5]" task.allow_alpha_extrapolation=true
    python run.py task=generate ... task.modality_gap=mean_offset

The text embedding r_t = E_T(prompt) takes the place of the image embedding Stage 2 was trained on:
w_r(alpha) = w + alpha T_G(w, r_t) (eq. 11). Writes into the run directory: ``grid.png`` (rows
prompts, columns seeds), ``depth.png`` (same layout, near = bright), ``alpha_sweep/<k>.png`` per
prompt (rows seeds, columns alpha values), ``turntable/<k>.mp4`` per prompt (the seeds side by side
under a yaw sweep), and ``generate.json`` (the protocol and the measured latencies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import UserError
from .base import RunContext, TaskConfig

DESCRIPTION = "text + camera + expression -> 3D portraits from a Stage-2 checkpoint (grids, alpha sweeps, depth, MP4)"


@dataclass
class Schema(TaskConfig):
    name: str = "generate"
    checkpoint: str = "???"  # a Stage-2 checkpoint of task=train_stage2, or its bundle (task=export)
    prompts: list[str] = field(default_factory=list)
    prompts_file: Optional[str] = None  # one prompt per line, '#' starts a comment line
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # one latent z per seed (columns of the grid)
    alpha: float = 1.0  # text strength of eq. 11 for the grid, depth maps and turntables
    alpha_sweep: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    allow_alpha_extrapolation: bool = False  # allow alpha outside [0, 1]
    truncation_psi: float = 0.7
    camera: str = "frontal"  # preset: frontal, left, right, three_quarter_left/right, up, down
    yaw: Optional[float] = None  # degrees; with pitch, replaces the preset's angles
    pitch: Optional[float] = None
    expression: str = "neutral"  # preset (neutral, smile, open_mouth, raised_brows, ...) or from_dataset
    expression_vector: list[float] = field(default_factory=list)  # explicit psi (the model's n_expr values)
    shape_vector: list[float] = field(default_factory=list)  # explicit beta (n_shape values); [] = mean identity
    jaw: Optional[float] = None  # radians, replaces the preset's jaw opening
    modality_gap: str = "none"  # none | mean_offset (see generation/modality_gap.py)
    clip_cache: Optional[str] = None  # the checkpoint's canonicalisation cache (default: the one it recorded)
    turntable: bool = True
    turntable_frames: int = 36
    turntable_yaw: float = 35.0  # degrees each side of the camera's yaw
    fps: int = 12
    batch_size: int = 8
    device: str = "auto"  # auto: cuda when available
    # backbone.compile for this run: off by default, since a few grids do not repay torch.compile's
    # ~1.5 min per batch size at eg3d_512; cuda for long runs (many prompts, big sweeps).
    compile: str = "off"
    # On CUDA, replay the text tower and the generator from CUDA graphs captured once per batch size
    # (utils/cuda_graphs.py): small batches are bound by kernel launches. No effect on CPUs.
    cuda_graphs: bool = True
    # float32 (TF32 matmuls on CUDA, torch's default) or bf16 (autocast; CUDA only): bf16 is the faster
    # one on GPUs (benchmarks/bench_generate.py), at bf16's precision.
    precision: str = "float32"

PRECISIONS = ("float32", "bf16")


def _check_alpha(value, key: str, allow: bool) -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r}: expected a number") from None
    if not math.isfinite(alpha):
        raise UserError(f"{key}={value!r}: expected a finite number")
    if not allow and not 0.0 <= alpha <= 1.0:
        raise UserError(f"{key}={alpha:g}: expected a value in [0, 1] (set task.allow_alpha_extrapolation=true "
                             "to go beyond)")
    return alpha


def validate(t: Schema) -> dict:
    """Checked scalar settings of ``t`` (every bad value: a UserError naming key, value, expectation)."""
    alpha = _check_alpha(t.alpha, "task.alpha", t.allow_alpha_extrapolation)
    if not len(t.alpha_sweep):
        raise UserError("task.alpha_sweep=[]: expected at least one alpha value")
    sweep = [_check_alpha(a, f"task.alpha_sweep[{i}]", t.allow_alpha_extrapolation) for i, a in enumerate(t.alpha_sweep)]
    if not len(t.seeds):
        raise UserError("task.seeds=[]: expected at least one seed")
    seeds = []
    for i, s in enumerate(t.seeds):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise UserError(f"task.seeds[{i}]={s!r}: expected an integer in [0, 2^63)")
        seeds.append(int(s))
    psi = float(t.truncation_psi)
    if not (math.isfinite(psi) and 0.0 <= psi <= 1.0):
        raise UserError(f"task.truncation_psi={t.truncation_psi!r}: expected a value in [0, 1] (1: no truncation)")
    from ..generation.modality_gap import MODES

    if t.modality_gap not in MODES:
        raise UserError(f"task.modality_gap={t.modality_gap!r}: expected one of {', '.join(MODES)}")
    from ..nn.compiled import COMPILE_MODES

    if t.compile not in COMPILE_MODES:
        raise UserError(f"task.compile={t.compile!r}: expected one of {', '.join(COMPILE_MODES)}")
    if t.precision not in PRECISIONS:
        raise UserError(f"task.precision={t.precision!r}: expected one of {', '.join(PRECISIONS)}")
    for key, value, low in (("batch_size", t.batch_size, 1), ("fps", t.fps, 1), ("turntable_frames", t.turntable_frames, 2)):
        if value < low:
            raise UserError(f"task.{key}={value}: expected >= {low}")
    if t.turntable:  # before any rendering: the turntables are written last, after the grids and sweeps
        from ..generation.writers import video_encoder_missing

        missing = video_encoder_missing()
        if missing:
            raise UserError(f"task.turntable=true writes MP4 videos, but {missing}; or set task.turntable=false")
    return {"alpha": alpha, "alpha_sweep": sweep, "seeds": seeds, "truncation_psi": psi}


def check_lvlm(cache: str | None, clip) -> dict:
    """Compare the LVLM with the one the checkpoint's canonicalisation cache was embedded with (its
    manifest's lvlm_model_id); UserError when they differ, a note when it cannot be checked."""
    from pathlib import Path

    from ..canonical.cache import MANIFEST, read_manifest

    if not cache:
        return {"check": "unchecked: the checkpoint records no canonicalisation cache"}
    if not (Path(cache) / MANIFEST).is_file():
        return {"check": f"unchecked: {cache} is not a canonicalisation-cache directory here"}
    expected = read_manifest(cache).get("lvlm_model_id")
    if expected != clip.model_id:
        raise UserError(f"lvlm: {clip.model_id} is not the LVLM the checkpoint was trained with: its canonicalisation "
                        f"cache {cache} was embedded with {expected}; pick that one (lvlm=..., lvlm.weights=...)")
    return {"check": "matched", "cache_lvlm_model_id": expected}


def machine_overrides(cfg) -> dict:
    """The config groups of this machine that replace a checkpoint's own (``open_for_inference``'s
    ``overrides``): FLAME cannot travel inside checkpoints, its files are wherever this machine's
    config says (morphable.flame_path, morphable.flame_landmarks_path)."""
    paths = {k: getattr(cfg.morphable, k) for k in ("flame_path", "flame_landmarks_path") if getattr(cfg.morphable, k)}
    return {"morphable": paths} if paths else {}


def run(cfg, ctx: RunContext) -> dict:
    import dataclasses
    import re
    from pathlib import Path

    import torch

    from ..utils.files import sha256_file
    from ..generation.modality_gap import ModalityGap
    from ..generation.morphable import resolve_morphable
    from ..generation.pipeline import TextToPortrait
    from ..generation.prompts import gather_prompts, validate_prompts
    from ..generation.views import resolve_view, turntable_yaws, view_labels
    from ..generation.writers import depth_to_gray, tile, tile_gray, write_png, write_video
    from ..lvlm import build_clip
    from ..systems.bundle import open_for_inference
    from ..utils.console import console
    from ..utils.files import write_json_atomic

    t = cfg.task
    settings = validate(t)
    seeds, alpha = settings["seeds"], settings["alpha"]
    view = resolve_view(t.camera, t.yaw, t.pitch)
    yaws = turntable_yaws(t.turntable_frames, t.turntable_yaw, view.yaw_deg) if t.turntable else []
    if t.checkpoint in (None, "", "???"):
        raise UserError("task.checkpoint is not set: a Stage-2 checkpoint of task=train_stage2 "
                        "(<run>/checkpoints/last.ckpt)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if t.device == "auto" else t.device)
    if t.precision == "bf16" and device.type != "cuda":
        raise UserError(f"task.precision=bf16 needs a CUDA device (this run's device is {device}); use float32")
    precision = torch.autocast("cuda", dtype=torch.bfloat16, enabled=t.precision == "bf16")
    clip = build_clip(dataclasses.replace(cfg.lvlm, device=str(device)))
    prompts = validate_prompts(gather_prompts(t.prompts, t.prompts_file), clip.tokenizer)
    overrides = {"backbone": {"compile": t.compile}, **machine_overrides(cfg)}
    system, opened = open_for_inference(t.checkpoint, map_location=device, overrides=overrides, kinds=("Stage2GAN",))
    model = system.geometry.morphable
    morph = resolve_morphable(model, seeds, t.expression, t.expression_vector, t.shape_vector, t.jaw,
                              dataset_path=str(cfg.data.path))
    cache = t.clip_cache or system.cfg.clip_cache or None
    if cache:
        from ..canonical.cache import check_recorded_identity

        check_recorded_identity(cache, system.cfg.clip_cache_identity, f"task.checkpoint={t.checkpoint}")
    lvlm = {"model_id": clip.model_id, "arch": cfg.lvlm.arch, "kind": cfg.lvlm.kind, **check_lvlm(cache, clip)}
    gap = None
    if t.modality_gap == "mean_offset":
        if not cache:
            raise UserError("task.modality_gap=mean_offset needs the canonicalisation cache: the checkpoint "
                            "records none, set task.clip_cache")
        gap = ModalityGap.estimate(clip, cache, cfg.data.path)
    centre = None
    if settings["truncation_psi"] != 1.0:
        from ..nn.mapping import settle_truncation_centre

        centre = settle_truncation_centre(system.G_ema.mapping)
        if centre["centre"] != "tracked w_avg":
            console.print(f"[yellow]generate: the checkpoint's tracked w_avg is {centre['tracked_distance_to_sampled_mean']} "
                          f"from the mean of {centre['samples']} sampled w (norm {centre['sampled_mean_norm']}): a "
                          "briefly trained model; truncation uses the sampled mean[/yellow]")
    engine = TextToPortrait(system, clip, gap, settings["truncation_psi"], cuda_graphs=t.cuda_graphs)
    with precision:
        text = engine.encode(prompts)  # (P,D)

    resolution = system.cfg.backbone.img_resolution
    nr = system.cfg.backbone.neural_rendering_resolution
    S, P = len(seeds), len(prompts)

    def render(prompt: int, cameras: torch.Tensor, rows: list[int], alpha_value: float) -> dict[str, torch.Tensor]:
        """Portraits of prompt ``prompt`` for seeds[rows] under cameras (len(rows),25), in batches."""
        outs = []
        for start in range(0, len(rows), t.batch_size):
            part = rows[start:start + t.batch_size]
            cond = {"camera": cameras[start:start + t.batch_size], **morph.rows(part)}
            with precision:
                out = engine.render([seeds[i] for i in part], cond, text[prompt].expand(len(part), -1), alpha_value)
            outs.append({k: out[k].float().cpu() for k in ("image", "image_depth", "image_alpha")})
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    console.print(f"generate: {P} prompts x {S} seeds at {resolution}^2, camera {view.name} (yaw {view.yaw_deg:g}, "
                  f"pitch {view.pitch_deg:g}), expression {t.expression}, alpha {alpha:g}")
    camera = view_labels(view.yaw_deg, view.pitch_deg).expand(S, -1)
    slugs = [f"{k:02d}_{re.sub(r'[^a-z0-9]+', '_', p.lower()).strip('_')[:40]}" for k, p in enumerate(prompts)]
    images = torch.empty(P, S, 3, resolution, resolution)
    depth = torch.empty(P, S, nr, nr, dtype=torch.uint8)
    for k in range(P):
        out = render(k, camera, list(range(S)), alpha)
        images[k] = out["image"]
        depth[k] = depth_to_gray(out["image_depth"], out["image_alpha"])
    files = {"grid": str(write_png(ctx.run_dir / "grid.png", tile(images))),
             "depth": str(write_png(ctx.run_dir / "depth.png", tile_gray(depth))),
             "alpha_sweep": [], "turntable": []}
    sweep = settings["alpha_sweep"]
    for k in range(P):
        columns = [render(k, camera, list(range(S)), a)["image"] for a in sweep]
        strip = torch.stack(columns, dim=1)  # (S, A, 3, R, R): rows seeds, columns alpha
        files["alpha_sweep"].append(str(write_png(ctx.run_dir / "alpha_sweep" / f"{slugs[k]}.png", tile(strip))))
    for k in range(P) if yaws else ():
        frames = []
        for yaw in yaws:
            cams = view_labels(yaw, view.pitch_deg).expand(S, -1)
            frames.append(tile(render(k, cams, list(range(S)), alpha)["image"][None]))
        files["turntable"].append(str(write_video(ctx.run_dir / "turntable" / f"{slugs[k]}.mp4", frames, t.fps)))

    latency = engine.latency.per_item_ms()
    protocol = {
        "checkpoint": {"path": str(t.checkpoint), "stage1_sha256": system.cfg.stage1_sha256, "clip_cache": cache,
                       # a bundle: its weights' hash and the training checkpoint it came from
                       **({"bundle_weights_sha256": opened["weights_sha256"], "source": opened["source"]}
                          if "weights_sha256" in opened else {"sha256": sha256_file(Path(t.checkpoint))})},
        "lvlm": lvlm,
        "prompts": prompts, "seeds": seeds, "alpha": alpha, "alpha_sweep": sweep,
        "truncation_psi": settings["truncation_psi"], "truncation_centre": centre,
        "camera": {"preset": view.name, "yaw_deg": view.yaw_deg, "pitch_deg": view.pitch_deg},
        "morphable": morph.description,
        "modality_gap": gap.summary() if gap is not None else {"mode": "none"},
        "turntable": {"frames": len(yaws), "yaw_deg": t.turntable_yaw if yaws else 0.0, "fps": t.fps},
        "resolution": resolution, "device": str(device), "batch_size": t.batch_size, "precision": t.precision,
    }
    record = {"protocol": protocol, "outputs": files,
              "latency_ms": {"text_encoding_per_prompt": latency.get("text_encoding"),
                             "text_encoding_first_call_per_prompt": latency.get("text_encoding_first_call"),
                             "generation_per_image": latency.get("generation"),
                             "generation_first_call_per_image": latency.get("generation_first_call"),
                             "images_generated": sum(engine.latency.items.get(k, 0) for k in
                                                     ("generation", "generation_first_call")),
                             "cuda_graphs": engine.graphs_used(), "cuda_graph_failure": engine.graph_failure,
                             "note": "host clock on CPU, CUDA events around each stage on GPU; batch "
                                     f"{t.batch_size}; *_first_call: the first call of each batch size (graph "
                                     "capture, warm-up, compilation), the others steady state (null: no such call)"}}
    write_json_atomic(ctx.run_dir / "generate.json", record)
    ctx.metrics.write({"event": "generate", **record})
    ms = {k: f"{v:.1f}" if v is not None else "-" for k, v in record["latency_ms"].items() if k.endswith(("_prompt", "_image"))}
    console.print(f"generate: wrote {ctx.run_dir} (text {ms['text_encoding_first_call_per_prompt']} ms/prompt at the "
                  f"first call; generation {ms['generation_per_image']} ms/image, "
                  f"{ms['generation_first_call_per_image']} at first calls)")
    return {"run_dir": str(ctx.run_dir), **files, "latency_ms": record["latency_ms"]}
