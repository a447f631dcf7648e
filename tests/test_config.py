"""The config tree: every option composes, bad keys/types/options are refused with one paragraph,
sweeps run with the basic and the submitit_local launchers, loggers write offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from clipportrait.cli import CONF_DIR, ConfigProblem, compose_config, preflight
from clipportrait.config import register_configs

register_configs()


def _compose(overrides, hydra_cfg=False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_cfg)


GROUP_OPTIONS = [
    (group.name, f.stem)
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir())
    for f in sorted(group.glob("*.yaml"))
]


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    """Each option file composes against the typed schema and passes the CLI's preflight checks."""
    overrides = [f"{group}={option}"]
    cfg = _compose(overrides, hydra_cfg=True)
    assert cfg.task.name
    preflight(overrides)  # raises ConfigProblem on anything the schema does not accept


def test_group_option_list_is_not_empty():
    """The groups the code supports so far exist (guards against a broken conf/ path)."""
    groups = {g for g, _ in GROUP_OPTIONS}
    assert {"task", "trainer", "logger", "launcher", "paths"} <= groups


def test_typed_schema_rejects_unknown_key_in_preflight():
    with pytest.raises(ConfigProblem) as err:
        preflight(["trainer.max_step=3"])
    msg = str(err.value)
    assert "trainer.max_step" in msg and "trainer.max_steps" in msg and "Allowed keys" in msg


def test_typed_schema_rejects_wrong_type_in_preflight():
    with pytest.raises(ConfigProblem) as err:
        preflight(["trainer.max_steps=abc"])
    assert "trainer.max_steps" in str(err.value) and "integer" in str(err.value)


def test_compose_config_gives_the_typed_config_run_py_would_run(tmp_path):
    """compose_config (notebooks, scripts): the experiment's groups, interpolations resolved, typed
    dataclasses; a misspelt key is the preflight's one-paragraph ConfigProblem."""
    from clipportrait.lvlm.config import LVLMConfig

    cfg = compose_config(["experiment=demo", f"paths.root_dir={tmp_path}"])
    assert isinstance(cfg.lvlm, LVLMConfig) and cfg.lvlm.arch == "clipportrait-cnn"
    assert cfg.task.name == "demo" and cfg.task.out_dir == f"{tmp_path}/outputs/demo"
    with pytest.raises(ConfigProblem, match="unknown config key 'backbone.chanels'.*Did you mean"):
        compose_config(["backbone.chanels=3"])


def test_every_sweep_value_is_checked():
    """A bad value hidden in the middle of a sweep list is caught before any job starts."""
    with pytest.raises(ConfigProblem) as err:
        preflight(["seed=1,oops,3"])
    assert "oops" in str(err.value)


@pytest.mark.parametrize(
    "args,must_contain",
    [
        (["trainer.max_step=3"], ["trainer.max_step", "did you mean", "max_steps", "allowed keys"]),
        (["trainer.max_steps=abc"], ["wrong type", "trainer.max_steps", "abc", "integer"]),
        (["trainer=gpux"], ["gpux", "trainer", "available", "cpu", "gpu"]),
        (["tranier.max_steps=1"], ["tranier", "trainer"]),
        (["+foo=1"], ["foo"]),
    ],
    ids=["misspelt-key", "wrong-type", "unknown-option", "misspelt-group", "extra-key"],
)
def test_cli_bad_config_gives_one_paragraph_and_nonzero_exit(run_cli, tmp_path, args, must_contain):
    """Bad input stops the run before work with exit 2 and a single-paragraph message, no traceback."""
    proc = run_cli("task=info", *args)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for text in must_contain:
        assert text.lower() in err.lower(), (text, err)
    assert not (tmp_path / "outputs").exists(), "no run directory may be created for a refused config"


def test_help_lists_tasks_and_groups(run_cli):
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "info" in proc.stdout and "trainer" in proc.stdout and "submitit_local" in proc.stdout


def _job_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("outputs/multirun/info/*/*/metrics.jsonl"))


@pytest.mark.slow(seconds=24)
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_multirun_runs_every_job_in_its_own_directory(run_cli, tmp_path, launcher):
    """`-m` with two seeds runs two jobs, each with its own run dir, resolved config and metrics."""
    proc = run_cli("-m", "task=info", "task.check_assets=false", "seed=3,4", f"launcher={launcher}",
                   "print_config=false", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _job_dirs(tmp_path)
    assert len(jobs) == 2, proc.stderr[-3000:]
    seeds = sorted(int(__import__("yaml").safe_load((j / "config_resolved.yaml").read_text())["seed"]) for j in jobs)
    assert seeds == [3, 4]
    for j in jobs:
        records = [json.loads(line) for line in (j / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["event"] == "task_end" and records[-1]["task"] == "info"
    if launcher == "submitit_local":
        assert list(tmp_path.glob("outputs/multirun/info/*/.submitit/*/*_result.pkl"))


def test_slurm_launcher_config_has_cluster_fields():
    """launcher=slurm selects submitit's SLURM launcher and exposes the fields cluster users set."""
    cfg = _compose(["launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
                    "hydra.launcher.gpus_per_node=4"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.account == "proj" and launcher.gpus_per_node == 4
    assert launcher.tasks_per_node == 4  # one task per GPU for DDP
    for key in ("nodes", "timeout_min", "cpus_per_task", "mem_gb"):
        assert key in launcher


@pytest.mark.parametrize("kind,expect", [("csv", "logs/metrics.csv"), ("tensorboard", "logs/events.out.tfevents.*"),
                                         ("wandb", "wandb/offline-run-*")])
def test_loggers_write_offline(run_cli, tmp_path, kind, expect):
    """Each logger kind records the info task's metric on disk without network."""
    proc = run_cli("task=info", "task.check_assets=false", f"logger={kind}", "print_config=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list(tmp_path.glob("outputs/runs/info/*"))
    assert len(run_dirs) == 1
    assert list(run_dirs[0].glob(expect)), sorted(str(p) for p in run_dirs[0].rglob("*"))[:50]


@pytest.mark.parametrize("overrides, cuda, expected", [
    ([], True, False),
    (["trainer.deterministic=true"], False, True),
    (["trainer.deterministic=true", "trainer.accelerator=auto"], False, True),
    (["trainer=gpu", "trainer.deterministic=true", "trainer.deterministic_warn_only=true"], True, "warn"),
    (["trainer=gpu", "trainer.deterministic=true"], True, None),
    (["trainer.accelerator=auto", "trainer.deterministic=true"], True, None),
])
def test_trainer_deterministic_is_refused_on_cuda_unless_warn_only(overrides, cuda, expected):
    """trainer.deterministic reaches Lightning as False/True/"warn"; on CUDA (gpu, or auto with a GPU)
    plain `true` is refused up front, naming the key and the way out, because torch has no deterministic
    CUDA backward for the generator's bilinear resizes."""
    from clipportrait.errors import UserError
    from clipportrait.tasks.train_stage1 import lightning_deterministic

    t = compose_config(overrides).trainer
    if expected is None:
        with pytest.raises(UserError, match="trainer.deterministic=true.*trainer.deterministic_warn_only=true"):
            lightning_deterministic(t, cuda_available=cuda)
    else:
        assert lightning_deterministic(t, cuda_available=cuda) == expected
