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


# -- FSDP2 (trainer.strategy = "fsdp") ---------------------------------------------------------
def shard(module: torch.nn.Module, device: torch.device) -> None:
    """Shard ``module``'s parameters over the process group in place (FSDP2, ``fully_shard``): each
    block of every ``nn.ModuleList`` (a backbone's repeated layers, gathered one at a time in the
    forward pass) as its own unit, then the rest with the root.  Parameter names do not change."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torchdist.get_world_size(),))

    def blocks(m):
        for child in m.children():
            if isinstance(child, torch.nn.ModuleList):
                yield from (b for b in child if any(True for _ in b.parameters()))
            else:
                yield from blocks(child)

    for block in list(blocks(module)):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(net: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The full (unsharded) state dicts of a sharded ``net`` and of its optimizer, in the format of a
    plain ``net.state_dict()`` / ``opt.state_dict()`` (the optimizer's keyed by parameter index), on
    the CPU of rank 0 (empty dicts elsewhere).  A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = get_model_state_dict(net, options=_options(cpu_offload=True))
    if opt is None:
        return model, None
    named = get_optimizer_state_dict(net, opt, options=_options(cpu_offload=True))
    if not named:
        return model, {}
    index = {name: i for i, (name, _) in enumerate(net.named_parameters())}
    return model, {"state": {index[k]: v for k, v in named["state"].items()},
                   "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in named["param_groups"]]}


def load_full_state(net: torch.nn.Module, model: dict, opt: torch.optim.Optimizer | None = None,
                    optim: dict | None = None) -> None:
    """Load full state dicts (:func:`full_state`'s format, which every rank holds) into a sharded ``net``
    and its optimizer; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(net, model, options=_options())
    if opt is not None and optim is not None:
        names = [name for name, _ in net.named_parameters()]
        named = {"state": {names[k]: v for k, v in optim["state"].items()},
                 "param_groups": [{**g, "params": [names[k] for k in g["params"]]} for g in optim["param_groups"]]}
        set_optimizer_state_dict(net, opt, named, options=_options())
