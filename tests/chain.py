"""The task chain at toy size, through the composed Hydra config (shared by the Stage-2 and generate
tests): synthetic data -> train_stage1 (1 step) -> canonicalize (raw embeddings of a random-weight
project CLIP) -> train_stage2 (2 steps). About 20 s on one CPU core."""

from __future__ import annotations

from pathlib import Path

# 32^2 tiny backbone, no deformation, no FID: the fastest configuration that runs every task.
SMALL = ["backbone.img_resolution=32", "backbone.neural_rendering_resolution=16", "backbone.sr_input_resolution=16",
         "backbone.depth_samples=6", "backbone.importance_samples=6", "backbone.triplane_resolution=32",
         "data.resolution=32", "data.synthetic.resolution=32", "data.synthetic.num_images=8",
         "data.synthetic.workers=1", "data.synthetic.contact_sheet=false", "data.batch_size=2", "data.num_workers=0",
         "deformation=none", "evaluation.at_end=false", "evaluation.every_kimg=0", "logger=none",
         "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "lvlm=random", "lvlm.random_seed=3",
         "print_config=false"]


def compose(root: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from clipportrait.cli import CONF_DIR
    from clipportrait.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[*SMALL, f"paths.root_dir={root}",
                                                             f"data.path={root / 'syn'}", *overrides])
        return OmegaConf.to_object(cfg)


def build_chain(root: Path) -> dict:
    from clipportrait.tasks import canonicalize, train_stage1, train_stage2
    from clipportrait.tasks.base import RunContext

    root = Path(root)
    s1 = train_stage1.run(compose(root, "task=train_stage1", "trainer.max_steps=1", "task.checkpoint_every_kimg=0",
                                  "task.grid_every_steps=0"), RunContext(run_dir=root / "s1"))
    cache = root / "cache"
    canonicalize.run(compose(root, "task=canonicalize", "task.embed=raw", f"task.out={cache}", "task.render_size=0"),
                     RunContext(run_dir=root / "canon"))
    stage2_args = ["task=train_stage2", f"task.stage1={s1['checkpoint']}", f"data.clip_cache={cache}",
                   "trainer.max_steps=2", "task.checkpoint_every_kimg=0", "task.grid_every_steps=0",
                   "task.alignment.hidden=32", "task.alignment.blocks=1"]
    ctx = RunContext(run_dir=root / "s2")
    s2 = train_stage2.run(compose(root, *stage2_args), ctx)
    return {"root": root, "stage1": s1["checkpoint"], "cache": cache, "stage2": s2["checkpoint"], "result": s2,
            "metrics": ctx.metrics.read(), "stage2_args": stage2_args}
