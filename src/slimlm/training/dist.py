"""Data parallelism for the training loop: the process group that `torchrun` or `accelerate launch` sets up.

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1 the loop
joins a process group (gloo on CPUs, nccl on CUDA GPUs), each process takes its rows of every global batch,
and after the backward pass the gradients of the trainable parameters are summed across processes (each
process's loss is already divided by the token count of the whole global batch, so the sum is the mean
gradient of the global batch: the same update as one process with the whole batch). Rank 0 alone writes
checkpoints and outputs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import Tensor


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started: bool = False      # whether this process group was started here (and is destroyed here)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(device: str = "cpu") -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Dist()
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        started = False
        if not tdist.is_initialized():
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            tdist.init_process_group(backend=backend, rank=rank, world_size=world)
            started = True
        return Dist(rank, world, local, started)

    def sum_(self, t: Tensor) -> Tensor:
        """In-place sum across processes (a no-op in one process)."""
        if self.world > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def sum_grads_(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients across processes, in one flat buffer (one collective per step)."""
        if self.world <= 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def close(self) -> None:
        if self.started and tdist.is_initialized():
            tdist.destroy_process_group()
