"""What happens inside a Hydra job: seed, print and save the config, run the task, record it."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .cli import CONF_DIR
from .config import register_configs
from .errors import UserError

# At import, not in main(): sweep jobs launched in other processes (submitit) unpickle this module
# and recompose their config there, so the schemas must be registered in every process.
register_configs()

log = logging.getLogger("clipportrait")


def run_task(cfg: DictConfig) -> dict:
    """Run ``cfg.task`` in the current Hydra run directory and return its result dict."""
    from lightning.fabric.utilities.seed import seed_everything

    from .tasks import load_task
    from .tasks.base import RunContext, is_rank_zero
    from .utils.console import print_config_tree
    from .utils.files import atomic_open

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ctx = RunContext(run_dir=run_dir)
    if is_rank_zero():  # the other processes of a distributed job share this run directory
        if cfg.get("print_config", True):
            print_config_tree(cfg)
        with atomic_open(run_dir / "config_resolved.yaml", "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
    seed_everything(int(cfg.seed), workers=True, verbose=False)
    task = load_task(cfg.task.name)
    typed = OmegaConf.to_object(cfg)  # dataclass instances: attribute access, typed fields
    start = time.time()
    log.info("task=%s run_dir=%s", cfg.task.name, run_dir)
    result = task.run(typed, ctx) or {}
    ctx.metrics.write({"event": "task_end", "task": cfg.task.name, "seconds": round(time.time() - start, 3),
                       **{k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}})
    return result


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> None:
    try:
        run_task(cfg)
    except UserError as err:
        log.error("%s", err)
        print(f"clipportrait: error: {err}", file=sys.stderr)
        sys.exit(1)
