"""task=info — what this installation has: versions, devices, offline assets, tracking check."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from .base import RunContext, TaskConfig

DESCRIPTION = "environment, devices, offline assets; logs one record to the chosen logger"


@dataclass
class Schema(TaskConfig):
    name: str = "info"
    check_assets: bool = True  # resolve/verify the offline weight sources (no download)


def collect_environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "torchvision", "easypytorch3d", "lightning", "hydra-core", "omegaconf",
                "open-clip-torch", "lpips", "torchmetrics", "torch-fidelity", "kornia", "wandb"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }
    return env


def run(cfg, ctx: RunContext) -> dict:
    from ..utils.console import console
    from ..utils.files import write_json_atomic
    from ..utils.loggers import build_logger

    env = collect_environment()
    if cfg.task.check_assets:
        from ..assets import SOURCES, AssetError, verified_source

        assets = {}
        for name in SOURCES:
            try:
                assets[name] = str(verified_source(name, allow_download=False))
            except AssetError as err:
                assets[name] = f"unavailable: {err}"
        env["asset_sources"] = assets
    write_json_atomic(ctx.run_dir / "environment.json", env)
    for key, value in env.items():
        console.print(f"[bold]{key}[/bold]: {value}")
    logger = build_logger(cfg.logger, ctx.run_dir)
    if logger is not None:
        logger.log_hyperparams({"python": env["python"], **{f"version/{k}": v for k, v in env["versions"].items()}})
        logger.log_metrics({"info/cuda_available": float(env["cuda_available"])}, step=0)
        logger.finalize("success")
    ctx.metrics.write({"event": "info", "cuda_available": env["cuda_available"], "logger": cfg.logger.kind})
    return {"cuda_available": env["cuda_available"]}
