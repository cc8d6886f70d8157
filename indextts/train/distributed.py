"""Processes and devices: the torchrun process group, the rank's device, the collectives the
trainer uses (no-ops in a single process)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from indextts.train.settings import PreflightError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> Dist:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def resolve_device(name: str, dist: Dist) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PreflightError("train.device is 'cuda' but torch sees no CUDA device: set train.device to auto or cpu, "
                                 "or run on a GPU node")
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(t)
    return t


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()

