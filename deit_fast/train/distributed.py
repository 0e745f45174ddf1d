"""torchrun / DDP plumbing: one command line for 1 or N processes on 1 or N nodes.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; without them (or with
WORLD_SIZE=1) this is a single process and nothing is initialised. NCCL on GPUs, gloo on CPU.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device_arg: str) -> "tuple[Dist, torch.device]":
    """Join the process group described by the environment; return it and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    kind = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind)
    if d.enabled and device.type == "cuda" and device.index is not None:
        raise ValueError(f"--device {device_arg} under torchrun would put all {world} ranks on one GPU: "
                         "pass --device cuda (each rank takes its LOCAL_RANK) or none")
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=d.rank, world_size=d.world)
    return d, device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned); a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
