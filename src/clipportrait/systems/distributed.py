"""Data parallelism for GAN systems, EG3D style: every rank holds full replicas, gradients are
all-reduced by hand after each phase's backward, so several backward passes per step (G main,
G reg, D main, D reg) with parameters switched on and off never confuse a DDP reducer.

`GanDDPStrategy` is Lightning's DDP strategy (process groups, launchers, SLURM, barriers, rank-0
checkpointing) with the DistributedDataParallel wrapper replaced by one broadcast of parameters and
buffers from rank 0 at setup.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy


def world() -> tuple[int, int]:
    """(world size, rank); (1, 0) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks in one flat all-reduce; non-finite entries
    become 0 (EG3D's nan_to_num) so one bad rank cannot poison the replicas."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    size, _ = world()
    if size > 1:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= size
        torch.nan_to_num(flat, nan=0.0, posinf=1e5, neginf=-1e5, out=flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    else:
        for g in grads:
            torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5, out=g)


@torch.no_grad()
def all_finite(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank (one host sync)."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if world()[0] > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().float().clone()
    size, _ = world()
    if size > 1:
        dist.all_reduce(values)
        values /= size
    return values


class GanDDPStrategy(DDPStrategy):
    """DDP process management without the DistributedDataParallel wrapper (see module docstring)."""

    strategy_name = "gan_ddp"

    def configure_ddp(self) -> None:
        assert self.model is not None
        if world()[0] == 1:
            return
        with torch.no_grad():
            for tensor in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(tensor.data, src=0)
