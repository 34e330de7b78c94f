"""Joining the process group that ``torchrun`` starts: shared by training and sampling, so that
inference code (``diffkit sample``) never imports the trainer."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torchdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device | None = None, *, ddp: bool = False) -> Dist:
    """Join the process group started by ``torchrun`` (if any); ``ddp=True`` when the caller will
    wrap a model in ``DistributedDataParallel`` (see below)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torchdist.is_initialized():
        # torch._dynamo, imported for the first time while a process group exists (DDP's constructor
        # imports it), keeps references to that group for good (10 of them, torch 2.13), so that
        # destroy_process_group cannot free it: its gloo threads then run on into interpreter
        # shutdown, where a rank can abort ("terminate called without an active exception", SIGABRT)
        # and torchrun exits 1.  Imported before the group exists, it takes none.  (Sampling uses no
        # DDP and is spared the import.)
        if ddp:
            import torch._dynamo  # noqa: F401

        backend = "nccl" if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda") else "gloo"
        torchdist.init_process_group(backend=backend)
    return Dist(torchdist.get_rank(), torchdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
