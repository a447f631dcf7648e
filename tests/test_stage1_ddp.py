"""Stage 1 under two CPU processes (gloo): gradients averaged by hand, one run directory, rank-0 files."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipportrait.data.config import SyntheticConfig
from clipportrait.data.synthetic import generate_synthetic


def _reduce_worker(rank: int, world: int, port: int, queue) -> None:
    from clipportrait.systems.distributed import all_finite, all_reduce_gradients, mean_over_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        p = torch.nn.Parameter(torch.zeros(3))
        q = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
        q.grad = torch.tensor([float("nan") if rank == 1 else 4.0, 8.0])
        all_reduce_gradients([p, q])
        finite = all_finite(torch.tensor(float("inf")) if rank == 1 else torch.tensor(1.0))
        queue.put((rank, p.grad.tolist(), q.grad.tolist(), finite, mean_over_ranks(torch.tensor([rank * 2.0])).item()))
    finally:
        dist.destroy_process_group()


def test_gradients_are_averaged_over_ranks():
    """all_reduce_gradients gives every rank the mean gradient, a NaN on one rank becomes 0 everywhere
    (not a poisoned replica), and all_finite is False on every rank when one rank is not finite."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_reduce_worker, args=(2, port, queue), nprocs=2, join=True)
    results = sorted(queue.get(timeout=30) for _ in range(2))
    for rank, p, q, finite, mean in results:
        assert p == [1.5, 3.0, 4.5]
        assert q == [0.0, 8.0]
        assert finite is False
        assert mean == 1.0


@pytest.mark.slow(seconds=26)
def test_two_process_training_writes_one_run_directory(run_cli, tmp_path):
    """`trainer.devices=2 trainer.strategy=ddp` on CPU: both processes share one Hydra run directory;
    config, metrics and checkpoints are written once (rank 0); kimg counts both ranks' images; the
    FID record says it was computed over 2 processes."""
    data = tmp_path / "syn"
    generate_synthetic(SyntheticConfig(num_images=8, resolution=32, workers=1, contact_sheet=False), data)
    proc = run_cli(
        "task=train_stage1", "data=folder", f"data.path={data}", "data.resolution=32", "data.batch_size=2",
        "data.num_workers=0", "backbone.img_resolution=32", "backbone.sr_input_resolution=16",
        "backbone.neural_rendering_resolution=16", "backbone.depth_samples=6", "backbone.importance_samples=6",
        "deformation=none", "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.devices=2",
        "trainer.strategy=ddp", "evaluation=quick", "evaluation.fid_samples=8", "evaluation.kid_subset_size=4",
        "evaluation.real_max=8", "task.checkpoint_every_kimg=0.008", "task.grid_every_steps=0", "print_config=false",
        "trainer.enable_progress_bar=false", timeout=600, env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "runs" / "train_stage1").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[-1]["kimg"] == pytest.approx(3 * 2 * 2 / 1000)  # steps x per-rank batch x ranks
    assert sum(r["event"] == "task_end" for r in records) == 1
    evaluation = [r for r in records if r["event"] == "evaluation"]
    assert len(evaluation) == 1 and evaluation[0]["protocol"]["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step-00000002.ckpt"]
    meta = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["clipportrait"]
    assert meta["world_size"] == 2 and meta["step"] == 3
    assert (run / "config_resolved.yaml").exists()
